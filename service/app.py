"""The gateway application: FastAPI, no torch. Queues work in Redis and streams events back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.broker import REDIS_DOWN, Broker, Overloaded
from service.deps import Gateway
from service.metrics import GatewayMetrics
from service.registry import Registry
from service.routes import generate, health, ws
from service.settings import GatewaySettings

log = logging.getLogger("dgserve.gateway")


class BodyLimit:
    """Refuse bodies over `limit` bytes with a 413 naming the limit (Content-Length or streamed)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse({"detail": f"request body is larger than {self.limit} bytes"}, status_code=413)
        await response({"type": "http"}, _no_receive, send)


class _TooLarge(Exception):
    pass


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


async def _refresh_gauges(gateway: Gateway) -> None:
    """Queue depth, pending requests and live workers, every 2 s, off the request path."""
    m = gateway.metrics
    while True:
        try:
            workers = await gateway.broker.workers()
            for name in gateway.registry.models:
                m.queue_depth.labels(name).set(await gateway.broker.queue_depth(name))
                m.stream_pending.labels(name).set(await gateway.broker.pending(name))
                m.workers.labels(name).set(sum(1 for w in workers if w.model.name == name))
            m.redis_up.set(1)
        except REDIS_DOWN:
            m.redis_up.set(0)
        except Exception:  # metrics must never take the gateway down
            log.exception("refreshing gauges failed")
        await asyncio.sleep(2.0)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = await run_in_threadpool(Registry.load, settings.model_paths(), settings.default_model_name())
        broker = Broker(settings.redis_url)
        gateway = Gateway(settings=settings, registry=registry, broker=broker, metrics=GatewayMetrics())
        app.state.gateway = gateway
        refresher = asyncio.create_task(_refresh_gauges(gateway))
        log.info("gateway ready: models %s (default %s)", sorted(registry.models), registry.default)
        try:
            yield
        finally:
            refresher.cancel()
            await broker.close()

    app = FastAPI(title="dgserve", version="0.1.0", lifespan=lifespan,
                  description="DiffusionGemma serving: continuous batching, every denoising step streamed.")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        request.app.state.gateway.metrics.http.labels(getattr(route, "path", "unmatched"),
                                                      str(response.status_code)).inc()
        return response

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded):
        request.app.state.gateway.metrics.rejected.labels("overloaded").inc()
        return JSONResponse({"detail": f"server overloaded: {exc}", "code": "overloaded"}, status_code=429,
                            headers={"Retry-After": str(settings.retry_after_s)})

    for redis_error in (RedisConnectionError, RedisTimeoutError):
        @app.exception_handler(redis_error)
        async def redis_down(request: Request, exc: Exception):
            request.app.state.gateway.metrics.rejected.labels("redis_unavailable").inc()
            return JSONResponse({"detail": "queue unavailable (Redis unreachable); retry later",
                                 "code": "unavailable"}, status_code=503,
                                headers={"Retry-After": str(settings.retry_after_s)})

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": "internal error", "code": "internal_error"}, status_code=500)

    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(ws.router)
    return app
