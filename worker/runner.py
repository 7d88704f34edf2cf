"""The worker runner: Redis in, engine steps, Redis out.

Threads, so that the GPU never waits on Redis:
- main: the engine loop (admit -> step -> hand events to the publisher), nothing else;
- fetcher: XREADGROUP new jobs (only as many as the engine has room for; the rest wait in Redis),
  and reclaims jobs whose worker died (XAUTOCLAIM);
- canceller: follows the broadcast cancel stream;
- publisher: turns engine events into contract events (detokenizes) and writes them, then
  acknowledges finished jobs;
- heartbeat: refreshes this worker's key (with what it serves and how busy it is).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from dgserve import contract
from worker.engine import Engine
from worker.text import Detokenizer
from worker.types import DoneEvent, EngineEvent, EngineRequest, StepEvent

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


@dataclass
class _Held:
    """A job this worker holds, from XREADGROUP to XACK."""

    job: contract.Job
    entry_id: bytes
    started: float = field(default_factory=time.monotonic)
    steps: int = 0
    suppressed: bool = False  # ended early (stop string): drop the engine's later events


class Runner:
    def __init__(
        self,
        engine: Engine,
        tokenizer,
        redis_url: str,
        model_name: str,
        worker_id: str,
        *,
        heartbeat_interval_s: float = 5.0,
        lease_ms: int = 30_000,
        max_attempts: int = 3,
        observer: Callable[[str, object], None] | None = None,
        on_step: Callable[[float, int, int, int], None] | None = None,
    ):
        self.engine = engine
        self.detok = Detokenizer(tokenizer)
        self.redis = redis.Redis.from_url(redis_url, **contract.client_options(asynchronous=False))
        self.model_name = model_name
        self.worker_id = worker_id
        self.stream = contract.request_stream(model_name)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.lease_ms = lease_ms
        self.max_attempts = max_attempts
        self.observe = observer or (lambda kind, payload: None)
        self.on_step = on_step or (lambda seconds, rows, running, pending: None)

        self._publish = self.redis.register_script(contract.PUBLISH_LUA)
        self._renew = self.redis.register_script(contract.RENEW_LUA)
        self._take_script = self.redis.register_script(contract.TAKE_LUA)
        self.inbox: queue.Queue[tuple[str, object]] = queue.Queue()
        self.outbox: queue.Queue[list[EngineEvent] | None] = queue.Queue()
        self.held: dict[str, _Held] = {}
        self.held_lock = threading.Lock()
        self.room = threading.Condition()  # signalled when a held job ends
        self.accepting = threading.Event()
        self.accepting.set()
        self.stopped = threading.Event()
        self.started_at = time.time()
        self.redis_ok = False
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._ensure_group()
        for target in (self._fetch_loop, self._cancel_loop, self._publish_loop, self._heartbeat_loop):
            t = threading.Thread(target=target, name=target.__name__, daemon=True)
            t.start()
            self._threads.append(t)

    def drain(self) -> None:
        """Stop taking new work (SIGTERM); held jobs finish or are handed back by `run`."""
        self.accepting.clear()

    def stop(self) -> None:
        self.accepting.clear()
        self.stopped.set()

    def _ensure_group(self) -> None:
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

    # ------------------------------------------------------------ main loop
    def run(self, drain_timeout_s: float = 60.0) -> None:
        """The engine loop, until stopped, or drained and idle."""
        drain_deadline: float | None = None
        while not self.stopped.is_set():
            self._apply_inbox(block=not self.engine.has_work())
            if not self.accepting.is_set():
                drain_deadline = drain_deadline or time.monotonic() + drain_timeout_s
                if not self.engine.has_work() and self.inbox.empty():
                    break
                if time.monotonic() > drain_deadline:
                    self._hand_back()
                    break
            if self.engine.has_work():
                started = time.perf_counter()
                rows = self.engine.active
                events = self.engine.step()
                if events:
                    self.outbox.put(events)
                self.on_step(time.perf_counter() - started, max(rows, self.engine.active), self.engine.active,
                             len(self.engine.pending))
        self.outbox.put(None)
        for t in self._threads:
            if t.name == "_publish_loop":
                t.join(timeout=30)

    def _apply_inbox(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "job":
                self.engine.add(payload)  # type: ignore[arg-type]
            elif kind == "cancel":
                self.engine.cancel(payload)  # type: ignore[arg-type]
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _hand_back(self) -> None:
        """Drain timed out: leave held jobs unacknowledged so that another worker reclaims them at once."""
        with self.held_lock:
            ids = list(self.held)
        log.warning("drain timeout: handing back %d requests", len(ids))
        for rid in ids:
            self.engine.cancel(rid)
            with self.held_lock:
                held = self.held.pop(rid, None)
            if held is None:
                continue
            try:  # idle time large enough for the next XAUTOCLAIM to take it
                self.redis.xclaim(self.stream, contract.GROUP, "handed-back", 0, [held.entry_id],
                                  idle=self.lease_ms * 10, justid=True)
            except REDIS_ERRORS:
                pass  # it will be reclaimed after its lease anyway

    # -------------------------------------------------------------- fetcher
    def _capacity(self) -> int:
        with self.held_lock:
            return self.engine.config.max_batch - len(self.held)

    def _fetch_loop(self) -> None:
        consumer = self.worker_id
        next_claim = 0.0
        while not self.stopped.is_set():
            if not self.accepting.is_set():
                time.sleep(0.1)
                continue
            room = self._capacity()
            if room <= 0:
                with self.room:
                    self.room.wait(timeout=0.2)
                continue
            try:
                entries: list = []
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + max(self.lease_ms / 4000, 0.5)
                    # Redis 6.2 answers [next, entries], 7.x [next, entries, deleted]
                    claimed = self.redis.xautoclaim(self.stream, contract.GROUP, consumer,
                                                    min_idle_time=self.lease_ms, start_id="0-0", count=room)
                    entries = [e for e in claimed[1] if e and e[1]]
                if not entries:
                    reply = self.redis.xreadgroup(contract.GROUP, consumer, {self.stream: ">"},
                                                  count=room, block=500)
                    entries = reply[0][1] if reply else []
                self.redis_ok = True
            except REDIS_ERRORS as exc:
                self.redis_ok = False
                log.warning("fetch: redis unreachable (%s)", exc)
                time.sleep(0.5)
                continue
            except redis.exceptions.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    self._ensure_group()
                    continue
                raise
            for entry_id, fields in entries:
                try:
                    self._take(entry_id, fields)
                except REDIS_ERRORS as exc:  # not acknowledged: it will be reclaimed after its lease
                    log.warning("fetch: redis unreachable while taking %s (%s)", entry_id, exc)

    def _take(self, entry_id: bytes, fields: dict) -> None:
        try:
            job = contract.decode_job(fields[contract.JOB_FIELD.encode()])
        except Exception as exc:  # a malformed job must not block the stream
            log.error("dropping malformed job %s: %s", entry_id, exc)
            self.redis.xack(self.stream, contract.GROUP, entry_id)
            return
        rid = job.request_id
        verdict, attempt = self._take_script(keys=[contract.request_key(rid)], args=[self.worker_id])
        verdict = verdict.decode() if isinstance(verdict, bytes) else verdict
        if verdict == "skip":  # it already ended (timed out, cancelled, or finished by a previous owner)
            self.redis.xack(self.stream, contract.GROUP, entry_id)
            return
        if verdict == "cancel":  # cancelled while it waited in the queue
            self._fail(job, entry_id, "cancelled", "request cancelled")
            return
        if attempt > self.max_attempts:
            self._fail(job, entry_id, "attempts_exhausted",
                       f"request failed on {attempt - 1} workers (max_attempts {self.max_attempts})",
                       deadletter=True)
            return
        if attempt == 1 and job.deadline is not None and time.time() > job.deadline:
            self._fail(job, entry_id, "timeout", "request waited in the queue past its deadline")
            return
        if attempt > 1:
            self.redis.xadd(contract.events_key(rid), {contract.EVENT_FIELD: contract.encode(
                contract.Restarted(request_id=rid, attempt=int(attempt)))})
        with self.held_lock:
            self.held[rid] = _Held(job, entry_id)
        self.observe("admitted", job)
        self.inbox.put(("job", EngineRequest(
            request_id=rid, prompt_ids=job.prompt_ids, template=job.template,
            params=job.sampling,
        )))

    def _fail(self, job: contract.Job, entry_id: bytes, code: str, message: str, deadletter: bool = False):
        rid = job.request_id
        pipe = self.redis.pipeline()
        pipe.xadd(contract.events_key(rid), {contract.EVENT_FIELD: contract.encode(
            contract.Error(request_id=rid, code=code, message=message))})
        pipe.expire(contract.events_key(rid), contract.EVENTS_TTL_S)
        pipe.hset(contract.request_key(rid), "status", "cancelled" if code == "cancelled" else "error")
        if deadletter:
            pipe.xadd(contract.DEADLETTER, {contract.JOB_FIELD: contract.encode(job), "reason": message},
                      maxlen=contract.DEADLETTER_MAXLEN, approximate=True)
        pipe.xack(self.stream, contract.GROUP, entry_id)
        pipe.execute()
        self.observe("failed", code)

    # ------------------------------------------------------------ canceller
    def _cancel_loop(self) -> None:
        last = "$"
        while not self.stopped.is_set():
            try:
                reply = self.redis.xread({contract.CANCELS: last}, block=500, count=100)
            except REDIS_ERRORS:
                time.sleep(0.5)
                continue
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    rid = fields.get(b"request_id", b"").decode()
                    with self.held_lock:
                        mine = rid in self.held
                    if mine:
                        self.inbox.put(("cancel", rid))

    # ------------------------------------------------------------ publisher
    def _publish_loop(self) -> None:
        while True:
            events = self.outbox.get()
            if events is None:
                return
            batch = self._convert(events)
            while True:  # never drop events: retry until Redis takes them
                try:
                    self._write(batch)
                    break
                except REDIS_ERRORS as exc:
                    self.redis_ok = False
                    log.warning("publish: redis unreachable (%s); retrying", exc)
                    time.sleep(0.5)
            self.redis_ok = True

    def _convert(self, events: list[EngineEvent]) -> list[tuple[contract.BaseModel, _Held | None]]:
        ending = {e.request_id for e in events if isinstance(e, DoneEvent)}
        out: list[tuple[contract.BaseModel, _Held | None]] = []
        for ev in events:
            with self.held_lock:
                held = self.held.get(ev.request_id)
            if held is None or held.suppressed:
                continue
            converted = self.detok.convert(ev, final_follows=ev.request_id in ending)
            if isinstance(ev, StepEvent):
                held.steps += 1
            if isinstance(converted, contract.Canvas) and held.job.stop:
                done = self._stop_string(held, converted)
                if done is not None:
                    converted = converted.model_copy(update={"text": converted.text[: len(converted.text)
                                                                                     - done[1]]})
                    out += [(converted, held), (done[0], held)]
                    held.suppressed = True
                    self.inbox.put(("cancel", ev.request_id))  # the engine drops the row next step
                    continue
            out.append((converted, held))
        return out

    def _stop_string(self, held: _Held, canvas: contract.Canvas) -> tuple[contract.Done, int] | None:
        """Stop strings apply when a canvas commits: cut the text at the first one and end the request.

        Returns the final event and how many characters of this canvas's text were cut.
        """
        rid = held.job.request_id
        text = self.detok.emitted(rid)
        cuts = [i for s in held.job.stop if (i := text.find(s)) >= 0]
        if not cuts:
            return None
        cut = min(cuts)
        tokens = self.detok.tokens(rid)
        self.detok.forget(rid)
        usage = contract.Usage(
            prompt_tokens=len(held.job.prompt_ids), completion_tokens=len(tokens), canvases=canvas.canvas + 1,
            denoising_steps=held.steps, tokens_per_forward=round(len(tokens) / max(held.steps, 1), 4),
        )
        done = contract.Done(request_id=rid, text=text[:cut], token_ids=tokens, finish_reason="stop_string",
                             usage=usage)
        return done, len(text) - cut

    def _write(self, batch: list[tuple[contract.BaseModel, _Held | None]]) -> None:
        """One atomic script per batch: events of jobs this worker still owns; finals also ack them."""
        per_request: dict[str, tuple[_Held, list[str], str]] = {}
        for event, held in batch:
            if held is None:
                continue
            rid = event.request_id  # type: ignore[attr-defined]
            _, payloads, final = per_request.setdefault(rid, (held, [], ""))
            payloads.append(contract.encode(event))
            if event.type in contract.FINAL_TYPES:  # type: ignore[attr-defined]
                final = "done" if event.type == "done" else (  # type: ignore[attr-defined]
                    "cancelled" if getattr(event, "code", "") == "cancelled" else "error")
            per_request[rid] = (held, payloads, final)
        if not per_request:
            return
        keys, args = [self.stream], [contract.GROUP, self.worker_id, contract.EVENTS_TTL_S, len(per_request)]
        for rid, (held, payloads, final) in per_request.items():
            keys += [contract.events_key(rid), contract.request_key(rid)]
            args += [held.entry_id, final, len(payloads), *payloads]
        lost = set(self._publish(keys=keys, args=args))
        for event, _ in batch:
            self.observe("event", event)
        ended = [rid for rid, (held, _, final) in per_request.items() if final or held.entry_id in lost]
        for rid, (held, _, _) in per_request.items():
            if held.entry_id in lost:
                log.warning("request %s was reclaimed by another worker; dropping it here", rid)
                self.inbox.put(("cancel", rid))
        if ended:
            with self.held_lock:
                for rid in ended:
                    self.held.pop(rid, None)
            with self.room:
                self.room.notify_all()

    # ------------------------------------------------------------ heartbeat
    def info(self) -> contract.WorkerInfo:
        return contract.WorkerInfo(
            worker_id=self.worker_id,
            model=contract.ModelInfo(name=self.model_name, canvas_length=self.engine.canvas_length,
                                     max_context=self.engine.config.max_context,
                                     max_batch=self.engine.config.max_batch),
            started_at=self.started_at, active=self.engine.active, pending=len(self.engine.pending),
            steps=self.engine.steps_run, draining=not self.accepting.is_set(),
        )

    def _heartbeat_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                self.redis.set(contract.worker_key(self.worker_id), contract.encode(self.info()),
                               ex=contract.HEARTBEAT_TTL_S)
                self._renew_leases()
                self.redis_ok = True
            except REDIS_ERRORS as exc:
                self.redis_ok = False
                log.warning("heartbeat: redis unreachable (%s)", exc)
            self.stopped.wait(self.heartbeat_interval_s)
        try:
            self.redis.delete(contract.worker_key(self.worker_id))
        except REDIS_ERRORS:
            pass

    def _renew_leases(self) -> None:
        """Reset the idle time of held jobs, so that nobody reclaims a live request; drop lost ones."""
        with self.held_lock:
            by_entry = {h.entry_id: rid for rid, h in self.held.items()}
        if not by_entry:
            return
        lost = self._renew(keys=[self.stream], args=[contract.GROUP, self.worker_id, *by_entry])
        for entry in lost:
            rid = by_entry.get(entry)
            if rid is None:
                continue
            log.warning("lease of %s lost (reclaimed by another worker); dropping it here", rid)
            with self.held_lock:
                self.held.pop(rid, None)
            self.inbox.put(("cancel", rid))


__all__ = ["Runner"]
