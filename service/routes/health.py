"""Liveness, readiness and metrics.

Readiness is the gateway's own: `/readyz` is 200 while the gateway can accept and queue requests (Redis
answers), whatever the workers. Queued requests wait in Redis for a worker, so a model scaled to zero, or a
worker rolling over, must not take the API out of its load balancer. Worker presence is its own signal:
the `workers` field of `/readyz`, and `/readyz/workers`, 200 only when every served model has a live worker
(what `dgserve up`, the tests and `helm test` wait for).
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import Gateway, GatewayDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def worker_presence(gateway: Gateway) -> dict:
    """Live workers and which served models have one (a draining worker takes no new work)."""
    workers = await gateway.broker.workers()
    served = {w.model.name for w in workers if not w.draining}
    return {"workers": len(workers), "models": sorted(served & set(gateway.registry.models)),
            "missing_models": sorted(set(gateway.registry.models) - served)}


@router.get("/readyz", responses={503: {"description": "Redis unreachable: requests cannot be queued"}})
async def readyz(gateway: GatewayDep):
    """Ready to accept and queue requests (Redis reachable). `workers` says who will run them."""
    if not await gateway.broker.ping():
        return JSONResponse({"ready": False, "reason": "redis unreachable"}, status_code=503)
    return {"ready": True, **await worker_presence(gateway), "time": time.time()}


@router.get("/readyz/workers", responses={503: {"description": "a model asked for has no live worker"}})
async def readyz_workers(gateway: GatewayDep,
                         model: Annotated[list[str] | None, Query(max_length=128)] = None):
    """Every served model (or every `model` named in the query) has a live worker. Not a probe for the
    gateway itself: requests queue while no worker runs."""
    if not await gateway.broker.ping():
        return JSONResponse({"ready": False, "reason": "redis unreachable"}, status_code=503)
    presence = await worker_presence(gateway)
    wanted = model or list(gateway.registry.models)
    unknown = sorted(set(wanted) - set(gateway.registry.models))
    if unknown:
        return JSONResponse({"detail": f"model: not served here: {', '.join(unknown)}"}, status_code=404)
    waiting = sorted(set(wanted) - set(presence["models"]))
    if waiting:
        reason = f"no live worker for {', '.join(waiting)}"
        return JSONResponse({"ready": False, "reason": reason, **presence}, status_code=503)
    return {"ready": True, **presence, "time": time.time()}


@router.get("/metrics")
async def metrics(gateway: GatewayDep) -> Response:
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)
