"""Submitting requests and following them to their final event on behalf of a client, cancelling if it leaves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from fastapi.responses import JSONResponse

from protocol import contract
from service.deps import Gateway


async def submit_all(gateway: Gateway, jobs: list[contract.Job], tenant: str, ref: str | None = None,
                     idempotency: tuple[str, str] | None = None) -> list[str]:
    """Queue every job for `tenant`, or none: a refusal part-way cancels those already queued. Returns the
    request ids (for a repeated Idempotency-Key, the earlier request's)."""
    queued: list[str] = []
    try:
        for job in jobs:
            queued.append(await gateway.broker.submit(job, tenant=tenant, max_depth=gateway.settings.max_queue_depth,
                                                      ref=ref, idempotency=idempotency))
            gateway.metrics.accepted.labels(job.model).inc()
    except BaseException:
        for rid in queued:
            await gateway.broker.cancel(rid)
        raise
    return queued


ERROR_STATUS = {"cancelled": 499, "timeout": 504, "too_long": 422, "overloaded": 429, "expired": 410,
                "deadline_exceeded": 504, "numerical_error": 422}


async def wait_final(gateway: Gateway, rid: str, model: str, disconnected: Callable[[], Awaitable[bool]],
                     deadline: float | None = None) -> contract.Done | contract.Error:
    """Follow the request's events to its final one; a client that disconnects cancels the request; a
    request still queued at its deadline ends with a `timeout` error."""
    started = time.monotonic()
    first_step = False

    async def read() -> contract.Done | contract.Error:
        nonlocal first_step
        async for _, event in gateway.broker.events(rid):
            if event.type == "step" and not first_step:
                first_step = True
                gateway.metrics.first_step.labels(model).observe(time.monotonic() - started)
            if event.type in contract.FINAL_TYPES:
                return event.parse()  # type: ignore[return-value]
        raise RuntimeError("event stream ended without a final event")

    async def watch() -> None:
        while not await disconnected():
            await asyncio.sleep(0.25)

    reader, watcher = asyncio.create_task(read()), asyncio.create_task(watch())
    expiry = asyncio.create_task(expire_at(gateway, rid, deadline))
    try:
        done, _ = await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if reader in done:
            final = reader.result()
            gateway.metrics.e2e.labels(model).observe(time.monotonic() - started)
            gateway.metrics.finished.labels(model, final.type if final.type == "done" else final.code).inc()
            return final
        await gateway.client_left(rid)
        gateway.metrics.finished.labels(model, "client_disconnected").inc()
        return contract.Error(request_id=rid, code="cancelled", message="client disconnected")
    finally:
        for task in (reader, watcher, expiry):
            task.cancel()


async def expire_at(gateway: Gateway, rid: str, deadline: float | None) -> None:
    """At the deadline, end the request if it is still queued (its reader then sees a `timeout` error)."""
    if deadline is None:
        return
    await asyncio.sleep(max(0.0, deadline - time.time()))
    await gateway.broker.expire_if_queued(rid)


def error_response(err: contract.Error) -> JSONResponse:
    status = ERROR_STATUS.get(err.code, 500)
    return JSONResponse({"detail": err.message, "code": err.code, "request_id": err.request_id}, status_code=status)
