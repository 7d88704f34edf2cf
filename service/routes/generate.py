"""POST /generate: one request, one final answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool

from service.deps import ApiKey, GatewayDep
from service.follow import error_response, wait_final
from service.jobs import build_job
from service.schemas import GenerateRequest, GenerateResponse

router = APIRouter(tags=["generate"], dependencies=[ApiKey])

ERRORS = {
    401: {"description": "missing or invalid API key"},
    422: {"description": "invalid body: the field and the limit are named"},
    429: {"description": "queue full; retry after Retry-After seconds"},
    503: {"description": "Redis unreachable; retry after Retry-After seconds"},
    504: {"description": "the request waited in the queue past its deadline"},
}


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS)
async def generate(
    body: GenerateRequest,
    request: Request,
    gateway: GatewayDep,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
):
    job = await run_in_threadpool(build_job, gateway.registry, gateway.settings, body)
    rid = await gateway.broker.submit(job, None, gateway.settings.max_queue_depth, idempotency_key)
    gateway.metrics.accepted.labels(job.model).inc()
    final = await wait_final(gateway, rid, job.model, request.is_disconnected, job.deadline)
    if final.type == "error":
        return error_response(final)
    return GenerateResponse(request_id=rid, model=job.model, text=final.text, token_ids=final.token_ids,
                            finish_reason=final.finish_reason, usage=final.usage)
