"""The worker runner: Redis in, engine steps, Redis out.

Threads, so that the GPU never waits on Redis:
- main: the engine loop (apply the inbox's messages -> step -> hand events to the publisher), nothing else;
- fetcher: takes new jobs (only as many as there is room for; the rest wait in Redis), and reclaims jobs whose
  worker went silent, never one this process runs itself;
- canceller: follows the broadcast cancel stream;
- publisher: turns engine events into contract events (`worker.publisher`), writes them and acknowledges finished
  jobs; a stop string it finds ends the request through the engine (`Finish`);
- heartbeat: refreshes this worker's key (with what it serves and how busy it is) and renews its leases.

The Redis side of each lives in `worker.broker`. The runner holds only the delivery state of its requests
(`worker.publisher.Deliveries`); their progress is the engine's rows.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import redis

from protocol import contract
from worker.broker import REDIS_ERRORS, WorkerBroker
from worker.engine import Engine
from worker.hooks import RunnerHooks
from worker.publisher import Deliveries, Delivery, Publisher
from worker.text import Detokenizer
from worker.types import Admit, Cancel, EngineEvent, EngineMessage, EngineRequest, Finish

log = logging.getLogger(__name__)


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
        hooks: RunnerHooks | None = None,
    ):
        self.engine = engine
        self.broker = WorkerBroker(redis_url, model_name, worker_id, lease_ms)
        self.model_name = model_name
        self.worker_id = worker_id
        self.heartbeat_interval_s = heartbeat_interval_s
        self.max_attempts = max_attempts
        self.hooks = hooks or RunnerHooks()

        self.inbox: queue.Queue[EngineMessage] = queue.Queue()
        self.outbox: queue.Queue[list[EngineEvent] | None] = queue.Queue()  # None: the engine loop has ended
        self.deliveries = Deliveries()
        self.publisher = Publisher(self.broker, self.deliveries, Detokenizer(tokenizer), self.inbox.put, self.hooks)
        self.accepting = threading.Event()
        self.accepting.set()
        self.stopped = threading.Event()
        self.started_at = time.time()
        self.redis_ok = False
        self._threads: list[threading.Thread] = []

    @property
    def stream(self) -> str:
        return self.broker.stream

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.broker.ensure_group()
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
                self._step()
        self.outbox.put(None)
        for t in self._threads:
            if t.name == "_publish_loop":
                t.join(timeout=30)

    def _step(self) -> None:
        started = time.perf_counter()
        rows = self.engine.active
        events = self.engine.step()
        if events:
            self.outbox.put(events)
        self.hooks.stepped(time.perf_counter() - started, max(rows, self.engine.active), self.engine.active,
                           len(self.engine.pending))

    def _apply_inbox(self, block: bool) -> None:
        """The runner's messages, in the order sent (the engine applies them between steps)."""
        try:
            message = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            match message:
                case Admit(request):
                    self.engine.add(request)
                case Cancel(request_id):
                    self.engine.cancel(request_id)
                case Finish(request_id, reason, keep_tokens):
                    self.engine.finish(request_id, reason, keep_tokens)
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _hand_back(self) -> None:
        """Drain timed out: hand held jobs back so that another worker reclaims them at once."""
        held = self.deliveries.release_all()
        log.warning("drain timeout: handing back %d requests", len(held))
        for delivery in held:
            self.engine.cancel(delivery.request_id)
        try:
            self.broker.hand_back([d.entry_id for d in held])
        except REDIS_ERRORS:
            pass  # they will be reclaimed after their lease anyway

    # -------------------------------------------------------------- fetcher
    def _room(self) -> int:
        """Free capacity: every held request counts (in the engine, on its way there, or publishing its end)."""
        return self.engine.config.max_batch - len(self.deliveries)

    def _fetch_loop(self) -> None:
        next_claim = 0.0
        while not self.stopped.is_set():
            if not self.accepting.is_set():
                time.sleep(0.1)
                continue
            room = self._room()
            if room <= 0:
                self.deliveries.wait_for_room(timeout=0.2)
                continue
            try:
                entries: list = []
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + max(self.broker.lease_ms / 4000, 0.5)
                    entries = self.broker.reclaim(room, list(self.deliveries.entries()))
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
                    self.broker.ensure_group()
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
        delivery = self.deliveries.hold(job, entry_id)  # before the take: a cancel from now on finds it
        if delivery is None:
            log.warning("request %s is already running here; dropping its second entry %s", job.request_id, entry_id)
            self.broker.drop(entry_id)
            return
        try:
            admit = self._decide(delivery)
        except BaseException:
            self.deliveries.release(job.request_id)
            raise
        if not admit:
            self.deliveries.release(job.request_id)
            return
        self.hooks.admitted(job)
        request = EngineRequest(request_id=job.request_id, prompt_ids=job.prompt_ids, template=job.template,
                                params=job.sampling, max_steps=job.max_steps, max_running_s=job.max_running_s)
        self.deliveries.hand_over(delivery, request, self.inbox.put)

    def _decide(self, delivery: Delivery) -> bool:
        """Whether a registered job runs here; a job that does not is ended (or skipped) in Redis."""
        job, entry_id = delivery.job, delivery.entry_id
        verdict, attempt = self.broker.take(job.request_id)
        if verdict == contract.Take.SKIP:
            self.broker.drop(entry_id)
            return False
        if verdict == contract.Take.CANCEL:
            return self._fail(delivery, contract.Error(request_id=job.request_id, code=contract.CANCELLED,
                                                       message="request cancelled"))
        if attempt > self.max_attempts:
            return self._fail(delivery, contract.Error(
                request_id=job.request_id, code="attempts_exhausted",
                message=f"request failed on {attempt - 1} workers (max_attempts {self.max_attempts})"), deadletter=True)
        if job.past_queue_deadline(attempt):
            return self._fail(delivery, contract.queue_timeout(job.request_id))
        if attempt > 1:
            return self.broker.restarted(job.request_id, entry_id, attempt)
        return True

    def _fail(self, delivery: Delivery, error: contract.Error, deadletter: bool = False) -> bool:
        """End a job this worker took without running it; False (it does not run)."""
        if self.broker.fail(delivery.job, delivery.entry_id, error, deadletter):
            self.hooks.published(error, delivery.job)
        return False

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
                self.deliveries.cancel(rid, self.inbox.put)

    # ------------------------------------------------------------ publisher
    def _publish_loop(self) -> None:
        while True:
            events = self.outbox.get()
            if events is None:
                return
            batch = self.publisher.convert(events)
            while True:  # never drop events: retry until Redis takes them
                try:
                    self.publisher.write(batch)
                    break
                except REDIS_ERRORS as exc:
                    self.redis_ok = False
                    log.warning("publish: redis unreachable (%s); retrying", exc)
                    time.sleep(0.5)
            self.redis_ok = True

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
        by_entry = self.deliveries.entries()
        for entry in self.broker.renew(list(by_entry)):
            rid = by_entry.get(entry)
            if rid is None:
                continue
            log.warning("lease of %s lost (reclaimed by another worker); dropping it here", rid)
            self.deliveries.release(rid)
            self.inbox.put(Cancel(rid))


__all__ = ["Runner"]
