"""The worker's side of the Redis contract (the mirror of `service/broker.py`): take jobs, publish events,
renew leases, fail, hand back, follow cancels. Blocking calls, made from the runner's I/O threads; every key,
field and script comes from `protocol.contract`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from protocol import contract

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
Entry = tuple[bytes, dict[bytes, bytes]]


@dataclass
class Publication:
    """The events of one request in one publish: written only while this worker still owns its job."""

    entry_id: bytes
    payloads: list[str]
    final: str = ""  # the request's status if these events end it (done / error / cancelled)


class WorkerBroker:
    def __init__(self, redis_url: str, model: str, worker_id: str, lease_ms: int):
        self.redis = redis.Redis.from_url(redis_url, **contract.client_options(asynchronous=False))
        self.stream = contract.request_stream(model)
        self.worker_id = worker_id
        self.lease_ms = lease_ms
        self._publish = self.redis.register_script(contract.PUBLISH_LUA)
        self._renew = self.redis.register_script(contract.RENEW_LUA)
        self._take = self.redis.register_script(contract.TAKE_LUA)
        self._reclaim = self.redis.register_script(contract.RECLAIM_LUA)

    def ensure_group(self) -> None:
        """The model's consumer group exists (waits for Redis)."""
        while True:
            try:
                self.redis.xgroup_create(self.stream, contract.GROUP, id="0", mkstream=True)
                return
            except redis.exceptions.ResponseError as exc:
                if "BUSYGROUP" in str(exc):
                    return
                raise
            except REDIS_ERRORS as exc:
                log.warning("redis unreachable (%s); retrying", exc)
                time.sleep(1.0)

    # ------------------------------------------------------------ taking jobs
    def reclaim(self, count: int, held: Iterable[bytes]) -> list[Entry]:
        """Jobs of silent workers (idle past the lease), never one in `held` (what this process runs)."""
        claimed = self._reclaim(keys=[self.stream], args=[contract.GROUP, self.worker_id, self.lease_ms, count,
                                                          *held])
        return [(entry_id, dict(zip(fields[::2], fields[1::2], strict=True))) for entry_id, fields in claimed]

    def read_new(self, count: int, block_ms: int = 500) -> list[Entry]:
        reply = self.redis.xreadgroup(contract.GROUP, self.worker_id, {self.stream: ">"}, count=count,
                                      block=block_ms)
        return reply[0][1] if reply else []

    def take(self, request_id: str) -> tuple[contract.Take, int]:
        """The verdict on a job read here, and the attempt this is (see TAKE_LUA)."""
        verdict, attempt = self._take(keys=[contract.request_key(request_id)], args=[self.worker_id])
        return contract.Take(verdict.decode() if isinstance(verdict, bytes) else verdict), int(attempt)

    def restarted(self, request_id: str, entry_id: bytes, attempt: int) -> bool:
        """Tell the request's followers that its drafts start over; False if this worker no longer owns it."""
        event = contract.encode(contract.Restarted(request_id=request_id, attempt=attempt))
        return not self.publish({request_id: Publication(entry_id, [event])})

    def drop(self, entry_id: bytes) -> None:
        """Acknowledge and delete an entry that will not run (malformed, or its request already ended)."""
        pipe = self.redis.pipeline()
        pipe.xack(self.stream, contract.GROUP, entry_id)
        pipe.xdel(self.stream, entry_id)
        pipe.execute()

    def fail(self, job: contract.Job, entry_id: bytes, error: contract.Error, deadletter: bool = False) -> bool:
        """End a job this worker just took without running it: its error published as any final event is (only
        while this worker owns the job), and with `deadletter` the job kept in the dead-letter stream. False if
        this worker no longer owns it."""
        final = Publication(entry_id, [contract.encode(error)], contract.final_status(error))
        if self.publish({job.request_id: final}):
            return False
        if deadletter:
            entry = {contract.JOB_FIELD: contract.encode(job), contract.REASON_FIELD: error.message}
            self.redis.xadd(contract.DEADLETTER, entry, maxlen=contract.DEADLETTER_MAXLEN, approximate=True)
        return True

    # ------------------------------------------------------------- running
    def publish(self, batch: dict[str, Publication]) -> set[bytes]:
        """One atomic script for a batch of requests' events; returns the entries this worker no longer owns."""
        keys, args = [self.stream], [contract.GROUP, self.worker_id, contract.EVENTS_TTL_S, len(batch)]
        for rid, pub in batch.items():
            keys += [contract.events_key(rid), contract.request_key(rid)]
            args += [pub.entry_id, pub.final, len(pub.payloads), *pub.payloads]
        return set(self._publish(keys=keys, args=args))

    def renew(self, entry_ids: list[bytes]) -> list[bytes]:
        """Reset the idle time of the jobs this worker still owns; returns those it lost."""
        if not entry_ids:
            return []
        return list(self._renew(keys=[self.stream], args=[contract.GROUP, self.worker_id, *entry_ids]))

    def hand_back(self, entry_ids: list[bytes]) -> None:
        """Give jobs back with an idle time past any lease, so that the next reclaim anywhere takes them."""
        if entry_ids:
            self.redis.xclaim(self.stream, contract.GROUP, contract.HANDED_BACK, 0, entry_ids,
                              idle=self.lease_ms * 10, justid=True)

    def cancels_tail(self) -> str:
        """The id of the newest cancel so far: reading on from it misses none that come later (a blocking read
        from '$' would miss those that come between two reads)."""
        newest = self.redis.xrevrange(contract.CANCELS, count=1)
        return newest[0][0].decode() if newest else "0-0"

    def cancels(self, last: str, block_ms: int = 500) -> tuple[str, list[str]]:
        """Request ids cancelled after `last`, and the new `last`."""
        out = []
        for _, entries in self.redis.xread({contract.CANCELS: last}, block=block_ms, count=100) or []:
            for entry_id, fields in entries:
                last = entry_id
                out.append(fields.get(contract.CANCEL_FIELD.encode(), b"").decode())
        return last, out

    # ------------------------------------------------------------ heartbeat
    def beat(self, info: contract.WorkerInfo) -> None:
        self.redis.set(contract.worker_key(self.worker_id), contract.encode(info), ex=contract.HEARTBEAT_TTL_S)

    def leave(self) -> None:
        try:
            self.redis.delete(contract.worker_key(self.worker_id))
        except REDIS_ERRORS:
            pass
