"""Liveness, readiness and metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import GatewayDep

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(gateway: GatewayDep):
    if not await gateway.broker.ping():
        return JSONResponse({"ready": False, "reason": "redis unreachable"}, status_code=503)
    workers = await gateway.broker.workers()
    served = {w.model.name for w in workers if not w.draining}
    missing = sorted(set(gateway.registry.models) - served)
    if not served:
        return JSONResponse({"ready": False, "reason": "no worker heartbeat", "missing_models": missing},
                            status_code=503)
    return {"ready": True, "workers": len(workers), "models": sorted(served), "missing_models": missing,
            "time": time.time()}


@router.get("/metrics")
async def metrics(gateway: GatewayDep) -> Response:
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)
