"""The worker runner: Redis in, engine steps, Redis out.

Threads, so that the GPU never waits on Redis:
- main: the engine loop (admit -> step -> hand events to the publisher), nothing else;
- fetcher: takes new jobs (only as many as the engine has room for; the rest wait in Redis), and reclaims
  jobs whose worker went silent, never one this process runs itself;
- canceller: follows the broadcast cancel stream;
- publisher: turns engine events into contract events (detokenizes), ends requests that pass their running
  deadline, writes the events and acknowledges finished jobs;
- heartbeat: refreshes this worker's key (with what it serves and how busy it is) and renews its leases.

The Redis side of each lives in `worker.broker`; this module keeps only the delivery state of what it holds.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from protocol import contract
from worker.broker import REDIS_ERRORS, Publication, WorkerBroker
from worker.engine import Engine
from worker.text import Detokenizer
from worker.types import DoneEvent, EngineEvent, EngineRequest, StepEvent

log = logging.getLogger(__name__)


@dataclass
class _Held:
    """A job this worker holds, from its take to its final event (the engine's row is its progress)."""

    job: contract.Job
    entry_id: bytes
    started: float = field(default_factory=time.monotonic)
    steps: int = 0
    admitted: bool = False  # handed to the engine
    cancel_requested: bool = False  # cancelled before it was handed to the engine
    suppressed: bool = False  # ended here (stop string, running deadline): drop the engine's later events


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
        self.broker = WorkerBroker(redis_url, model_name, worker_id, lease_ms)
        self.model_name = model_name
        self.worker_id = worker_id
        self.heartbeat_interval_s = heartbeat_interval_s
        self.lease_ms = lease_ms
        self.max_attempts = max_attempts
        self.observe = observer or (lambda kind, payload: None)
        self.on_step = on_step or (lambda seconds, rows, running, pending: None)

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

    @property
    def redis(self) -> redis.Redis:
        return self.broker.redis

    @property
    def stream(self) -> str:
        return self.broker.stream

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
        self.broker.ensure_group()

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
        """Drain timed out: hand held jobs back so that another worker reclaims them at once."""
        with self.held_lock:
            held, self.held = self.held, {}
        log.warning("drain timeout: handing back %d requests", len(held))
        for rid in held:
            self.engine.cancel(rid)
        try:
            self.broker.hand_back([h.entry_id for h in held.values()])
        except REDIS_ERRORS:
            pass  # they will be reclaimed after their lease anyway

    # -------------------------------------------------------------- fetcher
    def _capacity(self) -> int:
        with self.held_lock:
            return self.engine.config.max_batch - len(self.held)

    def _fetch_loop(self) -> None:
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
                    with self.held_lock:
                        mine = [h.entry_id for h in self.held.values()]
                    entries = self.broker.reclaim(room, mine)
                if not entries:
                    entries = self.broker.read_new(room)
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
            self.broker.drop(entry_id)
            return
        rid = job.request_id
        held = _Held(job, entry_id)
        with self.held_lock:
            duplicate = rid in self.held
            if not duplicate:
                self.held[rid] = held  # registered before the take: a cancel from now on finds it
        if duplicate:
            log.warning("request %s is already running here; dropping its second entry %s", rid, entry_id)
            self.broker.drop(entry_id)
            return
        try:
            admit = self._decide(held)
        except BaseException:
            self._release(rid)
            raise
        if not admit:
            self._release(rid)
            return
        self.observe("admitted", job)
        with self.held_lock:
            held.admitted = True
            self.inbox.put(("job", EngineRequest(request_id=rid, prompt_ids=job.prompt_ids, template=job.template,
                                                 params=job.sampling)))
            if held.cancel_requested:
                self.inbox.put(("cancel", rid))

    def _decide(self, held: _Held) -> bool:
        """Whether a registered job runs here; a job that does not is ended (or skipped) in Redis."""
        job, entry_id = held.job, held.entry_id
        verdict, attempt = self.broker.take(job.request_id)
        if verdict == "skip":  # it already ended (timed out, cancelled, or finished by a previous owner)
            self.broker.drop(entry_id)
            return False
        if verdict == "cancel":  # cancelled while it waited in the queue
            return self._fail(job, entry_id, "cancelled", "request cancelled")
        if attempt > self.max_attempts:
            return self._fail(job, entry_id, "attempts_exhausted",
                              f"request failed on {attempt - 1} workers (max_attempts {self.max_attempts})",
                              deadletter=True)
        if attempt == 1 and job.deadline is not None and time.time() > job.deadline:
            return self._fail(job, entry_id, "timeout", "request waited in the queue past its deadline")
        if attempt > 1:
            return self.broker.restarted(job.request_id, entry_id, attempt)
        return True

    def _fail(self, job: contract.Job, entry_id: bytes, code: str, message: str, deadletter: bool = False) -> bool:
        self.broker.fail(job, entry_id, contract.Error(request_id=job.request_id, code=code, message=message),
                         deadletter)
        self.observe("failed", code)
        return False

    def _release(self, rid: str) -> None:
        with self.held_lock:
            self.held.pop(rid, None)
        with self.room:
            self.room.notify_all()

    # ------------------------------------------------------------ canceller
    def _cancel_loop(self) -> None:
        last: str | None = None
        while not self.stopped.is_set():
            try:
                last = last or self.broker.cancels_tail()
                last, rids = self.broker.cancels(last)
            except REDIS_ERRORS:
                time.sleep(0.5)
                continue
            for rid in rids:
                self._cancel(rid)

    def _cancel(self, rid: str) -> None:
        with self.held_lock:
            held = self.held.get(rid)
            if held is None:
                return
            if held.admitted:
                self.inbox.put(("cancel", rid))
            else:  # `_take` passes it on with the job
                held.cancel_requested = True

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
            if isinstance(ev, StepEvent):
                held.steps += 1
                if not math.isfinite(ev.mean_entropy):  # never publish NaN: JSON has none, followers would choke
                    out.append(self._end_here(held, "numerical_error", "the sampler's entropies are not finite "
                                              "(are the temperatures too low for this model?)"))
                    continue
            converted = self.detok.convert(ev, final_follows=ev.request_id in ending)
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
            if isinstance(ev, StepEvent) and (overrun := self._past_deadline(held)):
                out.append(self._end_here(held, "deadline_exceeded", overrun))
        return out

    def _past_deadline(self, held: _Held) -> str | None:
        """Why a running request must end now (its running deadline), or None."""
        job = held.job
        if job.max_steps is not None and held.steps >= job.max_steps:
            return f"the request ran {held.steps} denoising steps, the limit per request of this deployment"
        elapsed = time.monotonic() - held.started
        if job.max_running_s is not None and elapsed > job.max_running_s:
            return f"the request ran for {elapsed:.0f} s, past the limit of {job.max_running_s:g} s per request"
        return None

    def _end_here(self, held: _Held, code: str, message: str) -> tuple[contract.BaseModel, _Held]:
        """End a running request with an error of the runner's own: the engine drops its row next step."""
        rid = held.job.request_id
        held.suppressed = True
        self.detok.forget(rid)
        self.inbox.put(("cancel", rid))
        log.warning("request %s ended: %s: %s", rid, code, message)
        return contract.Error(request_id=rid, code=code, message=message), held

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
        per_request: dict[str, Publication] = {}
        for event, held in batch:
            if held is None:
                continue
            pub = per_request.setdefault(held.job.request_id, Publication(held.entry_id, []))
            pub.payloads.append(contract.encode(event))
            if event.type in contract.FINAL_TYPES:  # type: ignore[attr-defined]
                pub.final = contract.final_status(event)  # type: ignore[arg-type]
        if not per_request:
            return
        lost = self.broker.publish(per_request)
        for event, _ in batch:
            self.observe("event", event)
        ended = [rid for rid, pub in per_request.items() if pub.final or pub.entry_id in lost]
        for rid, pub in per_request.items():
            if pub.entry_id in lost:
                log.warning("request %s was reclaimed by another worker; dropping it here", rid)
                self.inbox.put(("cancel", rid))
        for rid in ended:
            self._release(rid)

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
                self.broker.beat(self.info())
                self._renew_leases()
                self.redis_ok = True
            except REDIS_ERRORS as exc:
                self.redis_ok = False
                log.warning("heartbeat: redis unreachable (%s)", exc)
            self.stopped.wait(self.heartbeat_interval_s)
        self.broker.leave()

    def _renew_leases(self) -> None:
        """Reset the idle time of held jobs, so that nobody reclaims a live request; drop lost ones."""
        with self.held_lock:
            by_entry = {h.entry_id: rid for rid, h in self.held.items()}
        for entry in self.broker.renew(list(by_entry)):
            rid = by_entry.get(entry)
            if rid is None:
                continue
            log.warning("lease of %s lost (reclaimed by another worker); dropping it here", rid)
            self._release(rid)
            self.inbox.put(("cancel", rid))


__all__ = ["Runner"]
