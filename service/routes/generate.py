"""POST /generate: one request, one final answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool

from protocol.api import GenerateRequest, GenerateResponse
from service.broker import IdempotencyMismatch
from service.deps import ApiKey, Caller, GatewayDep
from service.follow import Follower, error_response
from service.identity import fingerprint
from service.jobs import build_job, field_error
from service.strictjson import StrictRoute

router = APIRouter(tags=["generate"], dependencies=[ApiKey], route_class=StrictRoute)

ERRORS = {
    401: {"description": "missing or invalid API key"},
    422: {"description": "invalid body (the field and the limit are named), or an Idempotency-Key reused with "
                         "another body"},
    429: {"description": "queue full; retry after Retry-After seconds"},
    503: {"description": "Redis unreachable; retry after Retry-After seconds"},
    504: {"description": "the request waited in the queue past its deadline"},
}


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(
    body: GenerateRequest,
    request: Request,
    gateway: GatewayDep,
    tenant: Caller,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
):
    """Idempotency-Key: a retry with the same key and body gets the first request's answer (keys are the
    caller's own, kept as long as the request's events)."""
    job = await run_in_threadpool(build_job, gateway, body)
    idempotency = None if idempotency_key is None else (idempotency_key, fingerprint("/generate", body))
    async with Follower(gateway, tenant) as follower:
        try:
            [rid] = await follower.submit([job], idempotency=idempotency)
        except IdempotencyMismatch as exc:
            raise field_error("Idempotency-Key", f"Idempotency-Key {exc}", None, "idempotency_mismatch",
                              where="header") from None
        final = await follower.final(rid, request.is_disconnected)
    if final.type == "error":
        return error_response(final)
    return GenerateResponse.of(final, job.model)
