"""WS /ws/generate: several requests per connection, every denoising step streamed.

Client -> server: {"type": "generate", ...same fields as POST /generate..., "ref": optional}
                  {"type": "cancel", "request_id": optional (all of this connection's if omitted)}
Server -> client: queued, step (every denoising step of every canvas), canvas, done | error;
                  every event carries its request_id. Problems with a message itself come back as
                  {"type": "error", "request_id": null, "code": ..., "message": ...}.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Literal

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError

from dgserve import contract
from service.broker import REDIS_DOWN, Overloaded
from service.deps import Gateway, GatewayDep, key_is_valid, websocket_key
from service.follow import expire_at, submit_all
from service.identity import ANONYMOUS, tenant_of
from service.jobs import build_job
from service.routes.sudoku import SudokuRequest, solve, sudoku_jobs
from service.schemas import WsCancel, WsGenerate

log = logging.getLogger(__name__)
router = APIRouter()


class WsSudoku(SudokuRequest):
    type: Literal["sudoku"]
    ref: str | None = Field(None, max_length=128)


async def _never() -> bool:
    return False


def describe(errors) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'message'}: {e['msg']}"
                     for e in errors)


class Session:
    def __init__(self, ws: WebSocket, gateway: Gateway, tenant: str):
        self.ws, self.gateway, self.tenant = ws, gateway, tenant
        self.lock = asyncio.Lock()
        self.tasks: dict[str, asyncio.Task] = {}

    async def send(self, payload: str) -> None:
        async with self.lock:
            await self.ws.send_text(payload)

    async def problem(self, code: str, message: str, request_id: str | None = None, **extra) -> None:
        await self.send(json.dumps({"type": "error", "request_id": request_id, "code": code, "message": message,
                                    **extra}))

    async def forward(self, rid: str, deadline: float | None) -> None:
        expiry = asyncio.create_task(expire_at(self.gateway, rid, deadline))
        try:
            async for _, event in self.gateway.broker.events(rid):
                await self.send(event.text)  # relayed as the worker wrote it
        except (WebSocketDisconnect, RuntimeError):
            # the client left while this request was open. Cancel it here: this task may notice before the
            # receive loop does, and `close` only cancels the tasks still registered
            await self._cancel_quietly(rid)
        finally:
            expiry.cancel()
            self.tasks.pop(rid, None)

    async def _cancel_quietly(self, rid: str) -> None:
        try:
            await self.gateway.broker.cancel(rid)
        except REDIS_DOWN:
            pass

    async def generate(self, data: dict) -> None:
        try:
            body = WsGenerate.model_validate(data)
        except ValidationError as exc:
            return await self.problem("validation_error", describe(exc.errors()), ref=data.get("ref"))
        gw = self.gateway
        try:
            job = await run_in_threadpool(build_job, gw, body)
        except RequestValidationError as exc:
            return await self.problem("validation_error", describe(exc.errors()), ref=body.ref)
        try:
            [rid] = await submit_all(gw, [job], self.tenant, body.ref)
        except Overloaded as exc:
            gw.metrics.rejected.labels("overloaded").inc()
            return await self.problem("overloaded", str(exc), ref=body.ref, retry_after=gw.settings.retry_after_s)
        except REDIS_DOWN:
            gw.metrics.rejected.labels("redis_unavailable").inc()
            return await self.problem("unavailable", "queue unavailable, retry later", ref=body.ref,
                                      retry_after=gw.settings.retry_after_s)
        self.tasks[rid] = asyncio.create_task(self.forward(rid, job.deadline))

    async def sudoku(self, data: dict) -> None:
        """A Sudoku: every attempt streams as a request of its own, then one `sudoku_result` event."""
        ref = data.get("ref")
        try:
            body = WsSudoku.model_validate(data)
            jobs = await run_in_threadpool(sudoku_jobs, self.gateway, body)
        except ValidationError as exc:
            return await self.problem("validation_error", describe(exc.errors()), ref=ref)
        except RequestValidationError as exc:
            return await self.problem("validation_error", describe(exc.errors()), ref=ref)
        try:
            await submit_all(self.gateway, jobs, self.tenant, body.ref)
        except Overloaded as exc:
            self.gateway.metrics.rejected.labels("overloaded").inc()
            return await self.problem("overloaded", str(exc), ref=ref, retry_after=self.gateway.settings.retry_after_s)
        for job in jobs:
            self.tasks[job.request_id] = asyncio.create_task(self.forward(job.request_id, job.deadline))
        self.tasks[f"sudoku:{jobs[0].request_id}"] = asyncio.create_task(self.sudoku_result(body, jobs))

    async def sudoku_result(self, body: WsSudoku, jobs) -> None:
        try:
            result = await solve(self.gateway, body, jobs, _never)
            if isinstance(result, contract.Error):
                await self.send(result.model_dump_json())
            else:
                await self.send(json.dumps({"type": "sudoku_result", "ref": body.ref, **result.model_dump()}))
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.tasks.pop(f"sudoku:{jobs[0].request_id}", None)

    async def cancel(self, data: dict) -> None:
        try:
            msg = WsCancel.model_validate(data)
        except ValidationError as exc:
            return await self.problem("validation_error", describe(exc.errors()))
        targets = [msg.request_id] if msg.request_id else [t for t in self.tasks if not t.startswith("sudoku:")]
        for rid in targets:
            if rid not in self.tasks:
                await self.problem("unknown_request", f"no open request {rid!r} on this connection", rid)
                continue
            await self.gateway.broker.cancel(rid)

    async def close(self) -> None:
        for rid, task in list(self.tasks.items()):
            if not rid.startswith("sudoku:"):
                await self._cancel_quietly(rid)
            task.cancel()


@router.websocket("/ws/generate")
async def ws_generate(ws: WebSocket, gateway: GatewayDep):
    settings = gateway.settings
    presented = websocket_key(ws)
    if settings.api_keys and not key_is_valid(presented, settings.api_keys):
        await ws.send_denial_response(JSONResponse({"detail": "missing or invalid API key"}, status_code=401))
        return
    tenant = tenant_of(presented) if settings.api_keys else ANONYMOUS
    client = ws.client.host if ws.client else "?"
    if gateway.connections_per_client.get(client, 0) >= settings.max_connections_per_client:
        await ws.send_denial_response(JSONResponse(
            {"detail": f"too many connections from this client (limit {settings.max_connections_per_client})"},
            status_code=429, headers={"Retry-After": str(settings.retry_after_s)}))
        return
    await ws.accept()
    gateway.connections_per_client[client] = gateway.connections_per_client.get(client, 0) + 1
    gateway.websockets.add(ws)
    gateway.metrics.websockets.inc()
    session = Session(ws, gateway, tenant)
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("text")
            if raw is None:
                raw = (message.get("bytes") or b"").decode("utf-8", "replace")
            if len(raw.encode()) > settings.max_ws_message_bytes:
                await session.problem("message_too_large", f"message is larger than {settings.max_ws_message_bytes}"
                                      " bytes")
                continue
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                await session.problem("invalid_json", f"message is not JSON: {exc.msg} at position {exc.pos}")
                continue
            if not isinstance(data, dict):
                await session.problem("invalid_message", "message must be a JSON object with a `type`")
                continue
            kind = data.get("type")
            if kind == "generate":
                await session.generate(data)
            elif kind == "cancel":
                await session.cancel(data)
            elif kind == "sudoku":
                await session.sudoku(data)
            else:
                await session.problem("invalid_message",
                                      f"unknown message type {kind!r}; use generate, sudoku or cancel")
    except WebSocketDisconnect:
        pass
    except REDIS_DOWN:
        log.warning("websocket session: redis unreachable")
    finally:
        await session.close()
        gateway.websockets.discard(ws)
        gateway.metrics.websockets.dec()
        gateway.connections_per_client[client] -= 1
        if not gateway.connections_per_client[client]:
            del gateway.connections_per_client[client]


__all__ = ["router", "contract"]
