"""WS /ws/generate: several requests per connection, every denoising step streamed.

Client -> server: {"type": "generate", ...same fields as POST /generate..., "ref": optional}
                  {"type": "sudoku", ...same fields as POST /sudoku..., "ref": optional}
                  {"type": "cancel", "request_id": optional (all of this connection's if omitted)}
                  {"type": "resume", "request_id": ..., "offset": how many of its events the client has}
Server -> client: queued, step (every denoising step of every canvas), canvas, done | error;
                  every event carries its request_id. A message the gateway cannot act on gets
                  {"type": "error", "request_id": null, "code": ..., "message": ..., "errors": [{"field", "message"}]}
                  (`protocol.api.MessageError`: `errors` names each offending field, `message` says the same for
                  a person; `ref` and `retry_after` where they apply).

A request belongs to the connection that sent (or resumed) it: `cancel` applies to it, and leaving cancels it.
`resume` picks up a request of the same caller (after a dropped connection or a gateway restart) from the
event after the first `offset`, as long as its events are kept (an hour after its last one).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from protocol import contract
from protocol.api import FieldError, MessageError, WsCancel, WsGenerate, WsResume, WsSudoku
from service.broker import REDIS_DOWN, Overloaded
from service.deps import Gateway, GatewayDep, key_is_valid, same_origin_or_allowed, websocket_key
from service.edge import field_errors
from service.follow import Follower
from service.identity import ANONYMOUS, tenant_of
from service.jobs import build_job
from service.routes.sudoku import solve, sudoku_jobs
from service.strictjson import JsonProblem, loads, printable

log = logging.getLogger(__name__)
router = APIRouter()


async def _never() -> bool:
    return False


def ref_of(data: dict) -> str | None:
    """The client's `ref`, echoed only when it is one (a short string)."""
    ref = data.get("ref")
    return ref if isinstance(ref, str) and len(ref) <= 128 else None


class Session:
    """One WebSocket connection: its requests are its follower's; leaving cancels those still running."""

    def __init__(self, ws: WebSocket, gateway: Gateway, tenant: str):
        self.ws, self.gateway = ws, gateway
        self.follower = Follower(gateway, tenant)
        self.lock = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()

    async def send(self, payload: str) -> None:
        async with self.lock:
            await self.ws.send_text(payload)

    async def problem(self, code: str, message: str, field: str | None = None, request_id: str | None = None,
                      **extra: Any) -> None:
        """A message the gateway cannot act on; `field` is the one at fault (None: the message as a whole)."""
        error = MessageError.of(code, [FieldError(field=field, message=message)], **extra)
        await self.send(error.model_copy(update={"request_id": request_id}).encode())

    async def invalid(self, exc: ValidationError | RequestValidationError, ref: str | None = None) -> None:
        await self.send(MessageError.of("validation_error", field_errors(exc.errors()), ref=ref).encode())

    def start(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def handle(self, data: object) -> None:
        if not isinstance(data, dict):
            return await self.problem("invalid_message", "message must be a JSON object with a `type`")
        handlers = {"generate": self.generate, "sudoku": self.sudoku, "cancel": self.cancel, "resume": self.resume}
        kind = data.get("type")
        handler = handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            return await self.problem("invalid_message", f"unknown message type {printable(kind)[:64]!r}; use "
                                      "generate, sudoku, cancel or resume", "type")
        await handler(data)

    async def forward(self, rid: str, offset: int = 0) -> None:
        try:
            async for event in self.follower.events(rid, offset):
                await self.send(event.text)  # relayed as the worker wrote it
        except (WebSocketDisconnect, RuntimeError):
            # the client left while this request was open. Leave it here: this task may notice before the
            # receive loop does
            await self.follower.leave(rid)

    async def _submit(self, jobs: list[contract.Job], ref: str | None) -> list[str]:
        """Queue jobs as this connection's; a refusal is an error event (and no request ids)."""
        gw = self.gateway
        try:
            return await self.follower.submit(jobs, ref)
        except Overloaded as exc:
            gw.metrics.rejected.labels("overloaded").inc()
            await self.problem("overloaded", str(exc), ref=ref, retry_after=gw.settings.retry_after_s)
        except REDIS_DOWN:
            gw.metrics.rejected.labels("redis_unavailable").inc()
            await self.problem("unavailable", "queue unavailable, retry later", ref=ref,
                               retry_after=gw.settings.retry_after_s)
        return []

    async def _accept(self, data: dict, kind: type[WsGenerate] | type[WsSudoku],
                      jobs_of: Callable[[Gateway, Any], list[contract.Job]]) -> tuple[Any, list[str]]:
        """Validate a message, build its jobs (off the event loop), queue them and forward each request's events.
        The body and the request ids; none for a refused message (its error event is sent)."""
        try:
            body = kind.model_validate(data)
            jobs = await run_in_threadpool(jobs_of, self.gateway, body)
        except (ValidationError, RequestValidationError) as exc:
            await self.invalid(exc, ref_of(data))
            return None, []
        rids = await self._submit(jobs, body.ref)
        for rid in rids:
            self.start(self.forward(rid))
        return body, rids

    async def generate(self, data: dict) -> None:
        await self._accept(data, WsGenerate, lambda gateway, body: [build_job(gateway, body)])

    async def sudoku(self, data: dict) -> None:
        """A Sudoku: every attempt streams as a request of its own, then one `sudoku_result` event."""
        body, rids = await self._accept(data, WsSudoku, sudoku_jobs)
        if rids:
            self.start(self.sudoku_result(body, rids))

    async def sudoku_result(self, body: WsSudoku, rids: list[str]) -> None:
        try:
            result = await solve(self.follower, body, rids, _never)
            if isinstance(result, contract.Error):
                await self.send(result.model_dump_json())
            else:
                await self.send(json.dumps({"type": "sudoku_result", "ref": body.ref, **result.model_dump()}))
        except (WebSocketDisconnect, RuntimeError):
            pass

    async def cancel(self, data: dict) -> None:
        try:
            msg = WsCancel.model_validate(data)
        except ValidationError as exc:
            return await self.invalid(exc)
        targets = [msg.request_id] if msg.request_id else self.follower.open()
        for rid in targets:
            if rid not in self.follower.open():
                await self.problem("unknown_request", f"no open request {rid!r} on this connection", "request_id",
                                   rid)
                continue
            await self.gateway.broker.cancel(rid)

    async def resume(self, data: dict) -> None:
        """Follow one of this caller's requests again, from the event after the first `offset`."""
        try:
            msg = WsResume.model_validate(data)
        except ValidationError as exc:
            return await self.invalid(exc)
        rid = msg.request_id
        if rid in self.follower.open():
            return await self.problem("already_open", f"request {rid!r} is already open on this connection",
                                      "request_id", rid)
        if await self.gateway.broker.owner(rid) != self.follower.tenant:  # another caller's is as unknown as none
            return await self.problem("unknown_request", f"no request {rid!r} of yours is kept here",
                                      "request_id", rid)
        self.follower.resume(rid)
        self.start(self.forward(rid, msg.offset))

    async def close(self) -> None:
        await self.follower.close()
        for task in list(self.tasks):
            task.cancel()


async def refusal(ws: WebSocket, gateway: Gateway) -> JSONResponse | None:
    """Why this WebSocket may not open (origin, key, connections per client), as the HTTP answer to send."""
    settings = gateway.settings
    if not same_origin_or_allowed(ws, settings.cors_origins):
        return JSONResponse({"detail": "this origin may not open a WebSocket here (DG_CORS_ORIGINS)"},
                            status_code=403)
    if settings.api_keys and not key_is_valid(websocket_key(ws), settings.api_keys):
        return JSONResponse({"detail": "missing or invalid API key"}, status_code=401)
    client = ws.client.host if ws.client else "?"
    if gateway.connections_per_client.get(client, 0) >= settings.max_connections_per_client:
        return JSONResponse(
            {"detail": f"too many connections from this client (limit {settings.max_connections_per_client})"},
            status_code=429, headers={"Retry-After": str(settings.retry_after_s)})
    return None


async def receive_loop(ws: WebSocket, session: Session, max_bytes: int) -> None:
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        raw = message.get("text")
        if raw is None:
            raw = (message.get("bytes") or b"").decode("utf-8", "replace")
        if len(raw.encode()) > max_bytes:
            await session.problem("message_too_large", f"message is larger than {max_bytes} bytes")
            continue
        try:
            data = loads(raw)
        except JsonProblem as exc:
            where = ".".join(printable(p) for p in exc.path) or None
            await session.problem("invalid_json", f"message is not strict JSON: {printable(exc.message)}", where)
            continue
        try:
            await session.handle(data)
        except REDIS_DOWN:
            await session.problem("unavailable", "queue unavailable, retry later",
                                  retry_after=session.gateway.settings.retry_after_s)
        except (WebSocketDisconnect, RuntimeError):
            raise
        except Exception:  # one bad message must not take the connection and its other requests down
            log.exception("websocket message failed")
            await session.problem("internal_error", "internal error")


@router.websocket("/ws/generate")
async def ws_generate(ws: WebSocket, gateway: GatewayDep):
    settings = gateway.settings
    denied = await refusal(ws, gateway)
    if denied is not None:
        await ws.send_denial_response(denied)
        return
    tenant = tenant_of(websocket_key(ws)) if settings.api_keys else ANONYMOUS
    client = ws.client.host if ws.client else "?"
    await ws.accept()
    gateway.connections_per_client[client] = gateway.connections_per_client.get(client, 0) + 1
    gateway.websockets.add(ws)
    gateway.metrics.websockets.inc()
    session = Session(ws, gateway, tenant)
    try:
        await receive_loop(ws, session, settings.max_ws_message_bytes)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        await session.close()
        gateway.websockets.discard(ws)
        gateway.metrics.websockets.dec()
        gateway.connections_per_client[client] -= 1
        if not gateway.connections_per_client[client]:
            del gateway.connections_per_client[client]
