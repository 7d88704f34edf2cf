"""Pure ASGI middleware at the gateway's edge.

Pure ASGI on purpose: Starlette's `BaseHTTPMiddleware` (`@app.middleware("http")`) runs the route behind a
memory stream of its own, so a route's `request.is_disconnected()` never sees the client leave, and a
non-streaming request whose client hung up would run to the end.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from fastapi.responses import JSONResponse
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from protocol.api import FieldError
from service.metrics import GatewayMetrics
from service.strictjson import INT_MAX, INT_MIN, printable

log = logging.getLogger("dgserve.gateway")


class CountRequests:
    """Counts HTTP answers by route template and status (`dgserve:http_requests`)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the client gets if the app raises before answering

        async def counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # set by the router when a route matched
            self.metrics.http.labels(route, str(status)).inc()


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


class InternalErrors:
    """An exception in a route answers 500 (in its API's shape, from `respond`) and the connection lives on.

    Starlette's own handler for `Exception` re-raises after answering, and the server then drops the
    connection: the client's next request on it would meet a reset.
    """

    def __init__(self, app: ASGIApp, respond: Callable[[Scope], Response]):
        self.app, self.respond = app, respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception:
            log.exception("unhandled error on %s", scope.get("path"))
            if not started:  # else the answer is half sent: the server closes the connection
                await self.respond(scope)(scope, receive, send)


def field_errors(errors: Sequence[Any]) -> list[FieldError]:
    """pydantic's errors as {field, message}: the field's dotted path in the body (None: the body as a whole)."""
    return [FieldError(field=".".join(printable(p) for p in e["loc"] if p != "body") or None,
                       message=printable(e["msg"])) for e in errors]


def safe_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Validation errors that always encode, without echoing large or unprintable input."""
    out = []
    for e in errors:
        item: dict[str, Any] = {"type": e.get("type"), "msg": printable(e.get("msg", "")),
                                "loc": [p if isinstance(p, int) else printable(p) for p in e.get("loc", ())]}
        if _echoable(e.get("input")):
            item["input"] = e["input"]
        if e.get("ctx"):
            item["ctx"] = {k: v if _echoable(v) else printable(v) for k, v in e["ctx"].items()}
        out.append(item)
    return out


def _echoable(value: Any) -> bool:
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return INT_MIN <= value <= INT_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= 200 and printable(value) == value
