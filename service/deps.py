"""Shared resources of the gateway, created in the lifespan and injected with `Annotated` aliases."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import unquote, urlsplit

from fastapi import Depends, HTTPException, Request, WebSocket
from starlette.requests import HTTPConnection

from service.broker import Broker
from service.identity import ANONYMOUS, tenant_of
from service.metrics import GatewayMetrics
from service.registry import Registry
from service.settings import GatewaySettings


@dataclass
class Gateway:
    settings: GatewaySettings
    registry: Registry
    broker: Broker
    metrics: GatewayMetrics
    websockets: set[WebSocket] = field(default_factory=set)
    worker_context: dict[str, int] = field(default_factory=dict)  # model -> largest max_context of a live worker
    shutting_down: bool = False
    connections_per_client: dict[str, int] = field(default_factory=dict)

    async def client_left(self, request_id: str) -> None:
        """A client left its request: cancel it, unless this gateway is shutting down (then the request runs on,
        for its client to resume from another gateway; its running deadline bounds it)."""
        if not self.shutting_down:
            await self.broker.cancel(request_id)


def _gateway(conn: HTTPConnection) -> Gateway:
    return conn.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(_gateway)]


def key_is_valid(presented: str | None, keys: list[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit on the first match)."""
    if not presented:
        return False
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented.encode(), key.encode())
    return ok


def bearer(conn: HTTPConnection) -> str | None:
    auth = conn.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def websocket_key(conn: HTTPConnection) -> str | None:
    """A WebSocket may present its key as a Bearer header, an X-API-Key header or an `api_key` query token.

    The query parameter's name must be spelled `api_key` exactly: a percent-encoded spelling (`api%5Fkey`)
    would authenticate under a name that log redaction does not know."""
    return bearer(conn) or conn.headers.get("x-api-key") or query_token(conn.scope.get("query_string", b""))


def query_token(query: bytes) -> str | None:
    for part in query.decode("latin-1").split("&"):
        name, sep, value = part.partition("=")
        if name == "api_key" and sep:
            return unquote(value) or None
    return None


def same_origin_or_allowed(conn: HTTPConnection, allowed: list[str]) -> bool:
    """A browser's WebSocket carries its page's Origin: only the gateway's own pages and DG_CORS_ORIGINS may
    open one (a page elsewhere must not use a visitor's network position or stored key). Clients that are not
    browsers send no Origin."""
    origin = conn.headers.get("origin")
    if origin is None or origin in allowed:
        return True
    return urlsplit(origin).netloc.lower() == conn.headers.get("host", "").lower()


def require_api_key(request: Request) -> str:
    """The caller's tenant; 401 without a valid Bearer key when the deployment has keys."""
    gateway: Gateway = request.app.state.gateway
    keys = gateway.settings.api_keys
    if not keys:
        return ANONYMOUS
    presented = bearer(request)
    if not key_is_valid(presented, keys):
        raise HTTPException(status_code=401, detail="missing or invalid API key",
                            headers={"WWW-Authenticate": "Bearer"})
    return tenant_of(presented)


ApiKey = Depends(require_api_key)
Caller = Annotated[str, ApiKey]  # the caller's tenant (FastAPI runs the check once per request)
