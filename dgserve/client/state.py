"""A stream's state machine: what it has seen of its request (no I/O). `AsyncStream` drives it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from dgserve.client.errors import DgError, RequestFailed, error_from_event
from protocol.api import GenerateResponse
from protocol.contract import Canvas, Done, Error, Queued, Restarted, Step

Event = Queued | Restarted | Step | Canvas | Done | Error
EVENT_TYPES: dict[str, type[BaseModel]] = {
    "queued": Queued, "restarted": Restarted, "step": Step, "canvas": Canvas, "done": Done, "error": Error,
}


def parse_event(data: Mapping[str, Any]) -> Event:
    """A WebSocket event (decoded JSON) as its `protocol.contract` model; fields this client does not know (a newer
    service's) are dropped."""
    model = EVENT_TYPES.get(str(data.get("type")))
    if model is None:
        raise DgError(f"unknown event type {data.get('type')!r}")
    return model.model_validate({k: v for k, v in data.items() if k in model.model_fields})  # type: ignore[return-value]


class StreamState:
    """What a stream has seen: its request, the committed canvases, the latest draft, the final event."""

    def __init__(self, body: dict[str, Any]):
        self.ref = uuid.uuid4().hex[:16]
        self.message = {"type": "generate", **body, "ref": self.ref}
        self.request_id: str | None = None
        self.queued: Queued | None = None
        self.result: Done | None = None  # the final Done, once the stream is over
        self.error: Error | None = None  # the final Error, if the request failed (cancelled, timeout, ...)
        self.canvases_done: list[Canvas] = []  # committed canvases (of the current attempt)
        self.draft: Step | None = None  # the latest step of the canvas being refined
        self.restarts = 0
        self.started_at: float | None = None
        self.elapsed: float | None = None  # seconds from sending the request to its final event
        self.finished = False
        self.cancel_pending = False

    @property
    def model(self) -> str | None:
        return self.queued.model if self.queued else None

    @property
    def seed(self) -> int | None:
        return self.queued.seed if self.queued else None

    @property
    def text(self) -> str:
        """The text committed so far (every canvas of the current attempt)."""
        return "".join(c.text for c in self.canvases_done)

    @property
    def completion(self) -> GenerateResponse | None:
        """The final answer in the shape of `generate`'s, once done."""
        if self.result is None or self.queued is None:
            return None
        return GenerateResponse.of(self.result, self.queued.model)

    def final(self) -> Done:
        """The final `Done`, or the RequestFailed of a request that ended with an error."""
        if self.result is not None:
            return self.result
        if self.error is not None:
            e = self.error
            raise RequestFailed(e.message, code=e.code, request_id=e.request_id)
        raise DgError("the stream ended without a final event")

    def on_queued_or_rejection(self, data: Mapping[str, Any]) -> Queued | None:
        """Before `queued`: the request's `queued` event, an exception for a refusal, None for anything else."""
        kind = data.get("type")
        if kind == "queued" and data.get("ref") in (None, self.ref):
            event = parse_event(data)
            assert isinstance(event, Queued)
            self.queued, self.request_id = event, event.request_id
            return event
        if kind == "error" and data.get("request_id") is None:
            raise error_from_event(data)
        return None

    def on_event(self, data: Mapping[str, Any]) -> Event | None:
        """After `queued`: the typed event to hand out, or None (another request's, a late cancel reply, or a
        type this client does not know)."""
        if data.get("request_id") != self.request_id:
            return None
        if data.get("type") == "error" and data.get("code") == "unknown_request":
            return None  # our cancel arrived after the request had ended: its final event is already here
        if data.get("type") not in EVENT_TYPES:
            return None  # an event type newer than this client
        event = parse_event(data)
        if isinstance(event, Restarted):
            self.restarts += 1
            self.canvases_done, self.draft = [], None
        elif isinstance(event, Step):
            self.draft = event
        elif isinstance(event, Canvas):
            self.canvases_done.append(event)
            self.draft = None
        elif isinstance(event, Done | Error):
            self.result, self.error = (event, None) if isinstance(event, Done) else (None, event)
            self.finished = True
            if self.started_at is not None:
                self.elapsed = time.monotonic() - self.started_at
        return event

    def cancel_message(self, request_id: str | None) -> dict[str, Any] | None:
        """The cancel to send now, or None (over already; or not yet queued: sent once it is)."""
        rid = request_id or self.request_id
        if self.finished:
            return None
        if rid is None:
            self.cancel_pending = True
            return None
        return {"type": "cancel", "request_id": rid}
