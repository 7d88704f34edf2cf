"""The one path every route takes to submit a client's requests and follow them to their final events.

A `Follower` holds the requests of one client (an HTTP request, or a WebSocket connection): it submits them all or
none, gives each one expiry timer (a request still queued at its deadline ends with a `timeout` error), records
the gateway's metrics as their events pass, and on `close` cancels every request not yet ended, as a client that
left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from protocol import contract
from service.broker import REDIS_DOWN
from service.deps import Gateway

log = logging.getLogger(__name__)

ERROR_STATUS = {"cancelled": 499, "timeout": 504, "too_long": 422, "overloaded": 429, "expired": 410,
                "deadline_exceeded": 504, "numerical_error": 422}
Final = contract.Done | contract.Error
Disconnected = Callable[[], Awaitable[bool]]


@dataclass
class _Followed:
    """One request a client follows."""

    model: str | None  # None: resumed (its model is not known here, and its metrics are its first follower's)
    timer: asyncio.Task | None
    started: float = field(default_factory=time.monotonic)
    stepped: bool = False
    ended: bool = False
    cancelled: bool = False


class Follower:
    def __init__(self, gateway: Gateway, tenant: str):
        self.gateway, self.tenant = gateway, tenant
        self._requests: dict[str, _Followed] = {}

    async def __aenter__(self) -> Follower:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------ submitting
    async def submit(self, jobs: list[contract.Job], ref: str | None = None,
                     idempotency: tuple[str, str] | None = None) -> list[str]:
        """Queue every job for this client, or none: a refusal part-way cancels those already queued. Returns
        the request ids (for a repeated Idempotency-Key, the earlier request's)."""
        gw, queued = self.gateway, []
        try:
            for job in jobs:
                rid = await gw.broker.submit(job, tenant=self.tenant, max_depth=gw.settings.max_queue_depth,
                                             ref=ref, idempotency=idempotency)
                queued.append(rid)
                gw.metrics.accepted.labels(job.model).inc()
                self._requests[rid] = _Followed(job.model, asyncio.create_task(self._expire(rid, job)))
        except BaseException:
            for rid in queued:
                await self.cancel(rid)
            raise
        return queued

    def resume(self, request_id: str) -> None:
        """Follow a request submitted earlier (by this caller, on another connection or gateway)."""
        self._requests[request_id] = _Followed(None, None)

    async def _expire(self, rid: str, job: contract.Job) -> None:
        if job.deadline is None:
            return
        while not job.past_queue_deadline():
            await asyncio.sleep(max(0.01, job.deadline - time.time()))
        await self.gateway.broker.expire_if_queued(rid)

    # ------------------------------------------------------------ following
    def following(self, request_id: str) -> bool:
        return request_id in self._requests

    def open(self) -> list[str]:
        """The requests this client follows that have not ended."""
        return [rid for rid, r in self._requests.items() if not r.ended]

    async def events(self, request_id: str, offset: int = 0) -> AsyncIterator[contract.RawEvent]:
        """The request's events after the first `offset`, ending after its final one."""
        async for _, event in self.gateway.broker.events_from(request_id, offset):
            self._saw(request_id, event)
            yield event

    def _saw(self, rid: str, event: contract.RawEvent) -> None:
        r = self._requests[rid]
        metrics = self.gateway.metrics
        if event.type == "step" and not r.stepped:
            r.stepped = True
            if r.model is not None:
                metrics.first_step.labels(r.model).observe(time.monotonic() - r.started)
        if event.type in contract.FINAL_TYPES and not r.ended:
            self._end(rid)
            if r.model is not None:
                metrics.e2e.labels(r.model).observe(time.monotonic() - r.started)
                final = event.parse()
                outcome = final.code if isinstance(final, contract.Error) else final.type
                metrics.finished.labels(r.model, outcome).inc()

    def _end(self, rid: str) -> None:
        r = self._requests[rid]
        r.ended = True
        if r.timer is not None:
            r.timer.cancel()

    async def final(self, request_id: str, disconnected: Disconnected) -> Final:
        """Follow the request to its final event; a client that disconnects first cancels it."""

        async def read() -> Final:
            async for event in self.events(request_id):
                if event.type in contract.FINAL_TYPES:
                    return event.parse()  # type: ignore[return-value]
            raise RuntimeError("event stream ended without a final event")

        async def watch() -> None:
            while not await disconnected():
                await asyncio.sleep(0.25)

        reader, watcher = asyncio.create_task(read()), asyncio.create_task(watch())
        try:
            done, _ = await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                return reader.result()
            await self.leave(request_id)
            return contract.Error(request_id=request_id, code=contract.CANCELLED, message="client disconnected")
        finally:
            reader.cancel()
            watcher.cancel()

    async def merged(self, request_ids: list[str], steps: bool = True
                     ) -> AsyncIterator[tuple[int, contract.Queued | contract.Restarted | contract.Step
                                                 | contract.Canvas | contract.Done | contract.Error]]:
        """The events of several requests as they come, each with its index in `request_ids` (without `steps`,
        step events are skipped unparsed). A request that cannot be followed ends with an `internal_error`."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, rid: str) -> None:
            try:
                async for event in self.events(rid):
                    if steps or event.type != "step":
                        await queue.put((index, event.parse()))
            except Exception:  # never a silent end: the client gets an error for this request
                log.exception("following %s failed", rid)
                await queue.put((index, contract.Error(request_id=rid, code="internal_error",
                                                       message="the gateway could not follow this request")))
                await self.cancel(rid)
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, rid)) for i, rid in enumerate(request_ids)]
        left = len(tasks)
        try:
            while left:
                index, event = await queue.get()
                if event is None:
                    left -= 1
                else:
                    yield index, event
        finally:
            for task in tasks:
                task.cancel()

    # ------------------------------------------------------------ ending
    async def cancel(self, request_id: str) -> None:
        """Cancel a request (its `cancelled` error follows in its events)."""
        self._requests[request_id].cancelled = True
        await self.gateway.broker.cancel(request_id)

    async def leave(self, request_id: str) -> None:
        """The client left this request: cancel it (unless the gateway is shutting down: see
        `Gateway.client_left`) and stop its timer."""
        r = self._requests[request_id]
        if r.ended:
            return
        self._end(request_id)
        if r.cancelled:  # cancelled here already (a Sudoku's losing attempt)
            return
        r.cancelled = True
        if r.model is not None:
            self.gateway.metrics.finished.labels(r.model, "client_disconnected").inc()
        try:
            await self.gateway.client_left(request_id)
        except REDIS_DOWN as exc:  # its running deadline still bounds it
            log.warning("could not cancel %s for a client that left (%s)", request_id, exc)

    async def close(self) -> None:
        """The client is gone: leave every request it still follows."""
        for rid in list(self._requests):
            await self.leave(rid)


def error_response(err: contract.Error) -> JSONResponse:
    status = ERROR_STATUS.get(err.code, 500)
    return JSONResponse({"detail": err.message, "code": err.code, "request_id": err.request_id}, status_code=status)
