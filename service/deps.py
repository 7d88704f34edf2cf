"""Shared resources of the gateway, created in the lifespan and injected with `Annotated` aliases."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated

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
    connections_per_client: dict[str, int] = field(default_factory=dict)


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
    """A WebSocket may present its key as a Bearer header, an X-API-Key header or an `api_key` query token."""
    return bearer(conn) or conn.headers.get("x-api-key") or conn.query_params.get("api_key")


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
