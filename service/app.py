"""The gateway application: FastAPI, no torch. Queues work in Redis and streams events back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from protocol import contract
from service.broker import REDIS_DOWN, Broker, Overloaded
from service.deps import Gateway
from service.edge import BodyLimit, CountRequests, InternalErrors, safe_errors
from service.metrics import GatewayMetrics
from service.registry import Registry
from service.routes import generate, health, openai, playground, requests, sudoku, ws
from service.settings import GatewaySettings
from service.strictjson import JsonProblem, printable

log = logging.getLogger("dgserve.gateway")


async def _watch_workers(gateway: Gateway) -> None:
    """Every 2 s, off the request path: the live workers' largest context per model (requests that fit none
    are refused at the door), and the gauges (queue depth, pending requests, live workers)."""
    m = gateway.metrics
    while True:
        try:
            workers = await gateway.broker.workers()
            gateway.worker_context = live_contexts(workers)
            for name in gateway.registry.models:
                m.queue_depth.labels(name).set(await gateway.broker.queue_depth(name))
                m.stream_pending.labels(name).set(await gateway.broker.pending(name))
                m.workers.labels(name).set(sum(1 for w in workers if w.model.name == name))
            m.redis_up.set(1)
        except REDIS_DOWN:
            m.redis_up.set(0)
        except Exception:  # metrics must never take the gateway down
            log.exception("watching the workers failed")
        await asyncio.sleep(2.0)


def live_contexts(workers: list[contract.WorkerInfo]) -> dict[str, int]:
    """Model -> the largest max_context among its workers that take work."""
    out: dict[str, int] = {}
    for w in workers:
        if not w.draining:
            out[w.model.name] = max(out.get(w.model.name, 0), w.model.max_context)
    return out


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = await run_in_threadpool(Registry.load, settings.model_paths(), settings.default_model_name())
        broker = Broker(settings.redis_url)
        gateway = Gateway(settings=settings, registry=registry, broker=broker, metrics=metrics)
        app.state.gateway = gateway
        refresher = asyncio.create_task(_watch_workers(gateway))
        log.info("gateway ready: models %s (default %s)", sorted(registry.models), registry.default)
        try:
            yield
        finally:
            refresher.cancel()
            await broker.close()

    # no /docs or /redoc: FastAPI loads their pages from a CDN, blank offline; /openapi.json stays
    app = FastAPI(title="dgserve", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="DiffusionGemma serving: continuous batching, every denoising step streamed.")

    def error(request: Request, status: int, message: str, code: str, headers: dict | None = None,
              kind: str = "server_error") -> JSONResponse:
        """Our shape, or OpenAI's error object under /v1."""
        if request.url.path.startswith("/v1"):
            return openai.OpenAIError(status, message, kind, None, code, headers).response()
        return JSONResponse({"detail": message, "code": code}, status_code=status, headers=headers)

    def internal(scope: Scope) -> JSONResponse:
        return error(Request(scope), 500, "internal error", "internal_error")

    # pure ASGI, innermost first: routes still see the client leave, and a 500 keeps its connection
    app.add_middleware(InternalErrors, respond=internal)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if not request.url.path.startswith("/v1"):
            return await http_exception_handler(request, exc)
        kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return error(request, exc.status_code, str(exc.detail), kind.replace("_error", ""), exc.headers, kind)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = safe_errors(exc.errors())
        if request.url.path.startswith("/v1"):
            return openai.error_from_validation(errors).response()
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(JsonProblem)
    async def not_strict_json(request: Request, exc: JsonProblem):
        if request.url.path.startswith("/v1"):
            param = ".".join(str(p) for p in exc.path) or None
            return openai.OpenAIError(400, printable(exc.describe()), param=param, code="invalid_json").response()
        loc = ["body", *(printable(p) for p in exc.path)]
        return JSONResponse({"detail": [{"type": "json_invalid", "loc": loc, "msg": printable(exc.message)}]},
                            status_code=422)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        request.app.state.gateway.metrics.rejected.labels("overloaded").inc()
        return error(request, 429, f"server overloaded: {exc}", "overloaded",
                     {"Retry-After": str(settings.retry_after_s)}, "rate_limit_error")

    for redis_error in (RedisConnectionError, RedisTimeoutError):
        @app.exception_handler(redis_error)
        async def redis_down(request: Request, exc: Exception):
            request.app.state.gateway.metrics.rejected.labels("redis_unavailable").inc()
            return error(request, 503, "queue unavailable (Redis unreachable); retry later", "unavailable",
                         {"Retry-After": str(settings.retry_after_s)})

    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(ws.router)
    app.include_router(openai.router)
    app.include_router(sudoku.router)
    app.include_router(requests.router)
    app.include_router(playground.router)
    return app
