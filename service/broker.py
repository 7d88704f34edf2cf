"""The gateway's side of the Redis contract: submit jobs, follow a request's events, cancel."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis import exceptions as redis_exc

from protocol import contract

log = logging.getLogger(__name__)

REDIS_DOWN = (redis_exc.ConnectionError, redis_exc.TimeoutError, OSError)


class Overloaded(Exception):
    def __init__(self, depth: int, limit: int):
        super().__init__(f"queue depth {depth} reached the limit {limit}")
        self.depth, self.limit = depth, limit


class IdempotencyMismatch(Exception):
    """An Idempotency-Key reused with a different body."""

    def __init__(self, request_id: str):
        super().__init__("was already used with a different body; use a new key for a new request")
        self.request_id = request_id


class Broker:
    def __init__(self, redis_url: str, max_connections: int = 4096):
        self.redis = aioredis.Redis.from_url(redis_url, **contract.client_options(asynchronous=True))
        # blocking XREADs hold a connection each, so they get their own, larger pool
        self.blocking = aioredis.Redis.from_url(redis_url, max_connections=max_connections,
                                                **contract.client_options(asynchronous=True, blocking=True))
        self._submit = self.redis.register_script(contract.SUBMIT_LUA)
        self._waiting = self.redis.register_script(contract.WAITING_LUA)
        self._timeout = self.redis.register_script(contract.TIMEOUT_LUA)

    async def close(self) -> None:
        await self.redis.aclose()
        await self.blocking.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except REDIS_DOWN:
            return False

    async def queue_depth(self, model: str, cap: int = 100_000) -> int:
        """Requests of `model` not yet taken by a worker (counted up to `cap`)."""
        return int(await self._waiting(keys=[contract.request_stream(model)], args=[contract.GROUP, cap]))

    async def pending(self, model: str) -> int:
        """Requests of `model` taken by a worker and not yet acknowledged."""
        try:
            summary = await self.redis.xpending(contract.request_stream(model), contract.GROUP)
        except redis_exc.ResponseError:
            return 0
        return int(summary.get("pending", 0))

    async def submit(self, job: contract.Job, *, tenant: str, max_depth: int, ref: str | None = None,
                     idempotency: tuple[str, str] | None = None) -> str:
        """Queue a job for `tenant`; returns its request id. `idempotency` is (Idempotency-Key, body fingerprint):
        a key this tenant already used returns that request's id if the body is the same, else
        IdempotencyMismatch."""
        rid = job.request_id
        queued = contract.Queued(request_id=rid, model=job.model, prompt_tokens=len(job.prompt_ids),
                                 seed=job.sampling.seed, ref=ref)
        keys = [contract.request_stream(job.model), contract.request_key(rid), contract.events_key(rid)]
        record = ""
        if idempotency is not None:
            keys.append(contract.idempotency_key(tenant, idempotency[0]))
            record = contract.encode(contract.IdempotencyRecord(request_id=rid, fingerprint=idempotency[1]))
        verdict, detail = await self._submit(keys=keys, args=[
            contract.GROUP, max_depth, contract.encode(job), contract.encode(queued), job.created_at, job.model,
            contract.REQUEST_TTL_S, contract.EVENTS_TTL_S, contract.REQUEST_STREAM_MAX_AGE_S, tenant, record,
            contract.IDEMPOTENCY_TTL_S])
        if verdict == 0:
            raise Overloaded(int(detail), max_depth)
        if verdict == 2:
            earlier = contract.IdempotencyRecord.model_validate_json(detail)
            if idempotency is not None and earlier.fingerprint != idempotency[1]:
                raise IdempotencyMismatch(earlier.request_id)
            return earlier.request_id
        return rid

    async def events(self, request_id: str, last_id: str = "0-0", block_ms: int = 5000
                     ) -> AsyncIterator[tuple[str, contract.RawEvent]]:
        """Every event of a request from `last_id` on, ending after the final one (done/error).

        Survives Redis restarts: while Redis is down it waits and resumes from the last id it saw. A stream that
        is gone (its events expired) ends with an `expired` error instead of waiting forever.
        """
        key = contract.events_key(request_id)
        reply: list | None = None
        while True:
            try:
                if not reply and not await self.redis.exists(key):
                    yield last_id, contract.RawEvent(contract.encode(contract.Error(
                        request_id=request_id, code="expired",
                        message=f"the request's events are gone (kept {contract.EVENTS_TTL_S} s after its last "
                                "event)")).encode())
                    return
                reply = await self.blocking.xread({key: last_id}, block=block_ms, count=512)
            except REDIS_DOWN as exc:
                log.warning("events %s: redis unreachable (%s); retrying", request_id, exc)
                await asyncio.sleep(0.5)
                continue
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id.decode()
                    event = contract.RawEvent(fields[contract.EVENT_FIELD.encode()])
                    yield last_id, event
                    if event.type in contract.FINAL_TYPES:
                        return

    async def events_from(self, request_id: str, offset: int) -> AsyncIterator[tuple[str, contract.RawEvent]]:
        """The request's events after the first `offset` (those a resuming client already has); nothing if
        those included the final one."""
        seen = await self.redis.xrange(contract.events_key(request_id), count=offset) if offset > 0 else []
        if seen and contract.RawEvent(seen[-1][1][contract.EVENT_FIELD.encode()]).type in contract.FINAL_TYPES:
            return
        async for item in self.events(request_id, seen[-1][0].decode() if seen else "0-0"):
            yield item

    async def owner(self, request_id: str) -> str | None:
        """The tenant that submitted a request (None: no such request is kept)."""
        tenant = await self.redis.hget(contract.request_key(request_id), contract.TENANT_FIELD)
        return tenant.decode() if tenant is not None else None

    async def expire_if_queued(self, request_id: str) -> bool:
        """End a request that no worker took before its deadline (a `timeout` error event)."""
        event = contract.queue_timeout(request_id)
        return bool(await self._timeout(keys=[contract.request_key(request_id), contract.events_key(request_id)],
                                        args=[contract.encode(event), contract.EVENTS_TTL_S]))

    async def cancel(self, request_id: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(contract.request_key(request_id), contract.CANCEL_REQUESTED_FIELD, contract.CANCEL_REQUESTED)
        pipe.xadd(contract.CANCELS, {contract.CANCEL_FIELD: request_id}, maxlen=contract.CANCEL_STREAM_MAXLEN,
                  approximate=True)
        await pipe.execute()

    async def workers(self) -> list[contract.WorkerInfo]:
        out = []
        async for key in self.redis.scan_iter(match=contract.WORKER_PATTERN, count=200):
            raw = await self.redis.get(key)
            if raw:
                out.append(contract.WorkerInfo.model_validate_json(raw))
        return out
