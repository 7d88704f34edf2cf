"""What the runner holds for each request, and its publisher: engine events -> contract events -> Redis.

A `Delivery` is the runner's part of a request: its job (what to publish: the stop strings), its stream entry (whose
lease the runner renews and which the final event acknowledges) and the handshake with the engine. The request's
progress is the engine's (`worker.scheduler.Row`), its text the detokenizer's.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pydantic import BaseModel

from protocol import contract
from worker.broker import Publication, WorkerBroker
from worker.hooks import RunnerHooks
from worker.text import Detokenizer
from worker.types import (
    Admit,
    Cancel,
    CanvasEvent,
    DoneEvent,
    EngineEvent,
    EngineMessage,
    EngineRequest,
    ErrorEvent,
    Finish,
    StepEvent,
)

log = logging.getLogger(__name__)

STOP_STRING = "stop_string"  # the finish reason of a request a stop string ended


@dataclass
class Delivery:
    job: contract.Job
    entry_id: bytes
    admitted: bool = False  # handed to the engine
    cancel_requested: bool = False  # cancelled before it was handed to the engine
    finishing: Finish | None = None  # a stop string ended it: only its final event is published from now on

    @property
    def request_id(self) -> str:
        return self.job.request_id


class Deliveries:
    """The requests this runner holds, by id, from their take to their final event (shared by its threads)."""

    def __init__(self) -> None:
        # also orders a cancel against the job's handover to the engine; notified when a request leaves
        self._lock = threading.Condition()
        self._held: dict[str, Delivery] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def hold(self, job: contract.Job, entry_id: bytes) -> Delivery | None:
        """Register a job (before its take: a cancel from then on finds it); None if it is held already."""
        with self._lock:
            if job.request_id in self._held:
                return None
            delivery = self._held[job.request_id] = Delivery(job, entry_id)
            return delivery

    def get(self, request_id: str) -> Delivery | None:
        with self._lock:
            return self._held.get(request_id)

    def entries(self) -> dict[bytes, str]:
        """Stream entry -> request id, of everything held."""
        with self._lock:
            return {d.entry_id: rid for rid, d in self._held.items()}

    def hand_over(self, delivery: Delivery, request: EngineRequest, send: Callable[[EngineMessage], None]) -> None:
        """Pass a job to the engine, with a cancel that came first; a cancel from now on goes straight there."""
        with self._lock:
            delivery.admitted = True
            send(Admit(request))
            if delivery.cancel_requested:
                send(Cancel(delivery.request_id))

    def cancel(self, request_id: str, send: Callable[[EngineMessage], None]) -> None:
        """A cancel of a held request: to the engine if it has the job, else with the job when it gets it."""
        with self._lock:
            delivery = self._held.get(request_id)
            if delivery is None:
                return
            if delivery.admitted:
                send(Cancel(request_id))
            else:
                delivery.cancel_requested = True

    def release(self, request_id: str) -> None:
        with self._lock:
            self._held.pop(request_id, None)
            self._lock.notify_all()

    def release_all(self) -> list[Delivery]:
        with self._lock:
            held, self._held = list(self._held.values()), {}
            self._lock.notify_all()
        return held

    def wait_for_room(self, timeout: float) -> None:
        with self._lock:
            self._lock.wait(timeout)


Batch = list[tuple[BaseModel, Delivery]]


class Publisher:
    """Turns a step's engine events into contract events (`convert`) and writes them in one script (`write`)."""

    def __init__(self, broker: WorkerBroker, deliveries: Deliveries, detok: Detokenizer,
                 send: Callable[[EngineMessage], None], hooks: RunnerHooks):
        self.broker, self.deliveries, self.detok = broker, deliveries, detok
        self.send = send  # to the engine, applied between its steps
        self.hooks = hooks

    def convert(self, events: list[EngineEvent]) -> Batch:
        ending = {e.request_id for e in events if isinstance(e, DoneEvent)}
        out: Batch = []
        for ev, delivery in self._held(events):
            if isinstance(ev, StepEvent):
                out.append((self.detok.step(ev), delivery))
            elif isinstance(ev, CanvasEvent):
                self.hooks.committed(ev)
                canvas = self.detok.canvas(ev, final=ev.request_id in ending, stop=delivery.job.stop)
                out.append((canvas.event, delivery))
                if canvas.keep_tokens is not None:
                    delivery.finishing = Finish(ev.request_id, STOP_STRING, canvas.keep_tokens)
                    self.send(delivery.finishing)
            elif isinstance(ev, DoneEvent):
                out.append((self.detok.done(_as_finished(ev, delivery.finishing)), delivery))
            elif isinstance(ev, ErrorEvent):
                out.append((self.detok.error(ev), delivery))
        return out

    def _held(self, events: list[EngineEvent]) -> Iterator[tuple[EngineEvent, Delivery]]:
        """The events to publish: of requests still held, and of a finishing one only its final event."""
        for ev in events:
            final = isinstance(ev, DoneEvent | ErrorEvent)
            delivery = self.deliveries.get(ev.request_id)
            if delivery is None:  # released here (lease lost, handed back): its text goes with its last event
                if final:
                    self.detok.forget(ev.request_id)
                continue
            if final or not delivery.finishing:
                yield ev, delivery

    def write(self, batch: Batch) -> None:
        """One atomic script: events of jobs this worker still owns; a final event also acknowledges its job."""
        per_request: dict[str, Publication] = {}
        for event, delivery in batch:
            pub = per_request.setdefault(delivery.request_id, Publication(delivery.entry_id, []))
            pub.payloads.append(contract.encode(event))
            if event.type in contract.FINAL_TYPES:  # type: ignore[attr-defined]
                pub.final = contract.final_status(event)  # type: ignore[arg-type]
        if not per_request:
            return
        lost = self.broker.publish(per_request)
        for event, delivery in batch:
            if delivery.entry_id not in lost:
                self.hooks.published(event, delivery.job)
        for rid, pub in per_request.items():
            if pub.entry_id in lost:
                log.warning("request %s was reclaimed by another worker; dropping it here", rid)
                self.send(Cancel(rid))
            if pub.final or pub.entry_id in lost:
                self.deliveries.release(rid)


def _as_finished(done: DoneEvent, finishing: Finish | None) -> DoneEvent:
    """The engine's own end of a request a stop string had already ended (it committed its last canvas before the
    `Finish` reached it): the same cut."""
    if finishing is None or done.finish_reason == finishing.reason:
        return done
    return dataclasses.replace(done, token_ids=done.token_ids[: finishing.keep_tokens], finish_reason=finishing.reason)
