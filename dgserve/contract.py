"""The Redis contract between the gateway and the workers.

This module alone spells key names, payload models and their encoding; both sides import it.
Every key written here has an expiry (streams of requests are trimmed instead, see `REQUEST_STREAM_MAXLEN`).

    dg:requests:{model}      stream  jobs for a model; consumer group `workers`
    dg:events:{request_id}   stream  events of one request (queued/restarted/step/canvas/done/error)
    dg:cancels               stream  request ids to cancel, read by every worker (broadcast)
    dg:request:{request_id}  hash    status of an accepted request (owner, attempts, deadline)
    dg:idem:{key}            string  Idempotency-Key -> request id
    dg:worker:{worker_id}    string  heartbeat (JSON WorkerInfo)
    dg:deadletter            stream  requests that failed `max_attempts` times
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

PREFIX = "dg"
GROUP = "workers"
EVENT_FIELD = "e"
JOB_FIELD = "job"

EVENTS_TTL_S = 3600  # a client may reconnect and replay for an hour
REQUEST_TTL_S = 24 * 3600
IDEMPOTENCY_TTL_S = 24 * 3600
HEARTBEAT_TTL_S = 15
CANCEL_STREAM_MAXLEN = 10_000
DEADLETTER_MAXLEN = 10_000
REQUEST_STREAM_MAXLEN = 100_000


def request_stream(model: str) -> str:
    return f"{PREFIX}:requests:{model}"


def events_key(request_id: str) -> str:
    return f"{PREFIX}:events:{request_id}"


def request_key(request_id: str) -> str:
    return f"{PREFIX}:request:{request_id}"


def idempotency_key(key: str) -> str:
    return f"{PREFIX}:idem:{key}"


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


WORKER_PATTERN = f"{PREFIX}:worker:*"
CANCELS = f"{PREFIX}:cancels"
DEADLETTER = f"{PREFIX}:deadletter"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sampling(_Model):
    """Concrete sampling parameters of one request (defaults already resolved)."""

    max_new_tokens: int
    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    stability_threshold: int
    confidence_threshold: float
    seed: int
    eos_token_ids: tuple[int, ...] = ()


class Job(_Model):
    """One accepted request, as queued for a worker."""

    request_id: str
    model: str
    prompt_ids: list[int]
    sampling: Sampling
    template: dict[int, int] | None = None  # canvas position -> token id
    stop: list[str] = []  # stop strings, applied when a canvas commits
    created_at: float = Field(default_factory=time.time)
    deadline: float | None = None  # epoch seconds; a job still queued past it ends with a timeout


# ------------------------------------------------------------------ events
class Queued(_Model):
    type: Literal["queued"] = "queued"
    request_id: str
    model: str
    prompt_tokens: int
    seed: int
    ref: str | None = None  # echoed from the client's WebSocket message, to pair requests and ids


class Restarted(_Model):
    """A worker took the request over again (the previous attempt died): drafts start over."""

    type: Literal["restarted"] = "restarted"
    request_id: str
    attempt: int


class Step(_Model):
    type: Literal["step"] = "step"
    request_id: str
    canvas: int
    step: int
    draft_ids: list[int]
    draft_text: str
    accepted: int
    mean_entropy: float


class Canvas(_Model):
    type: Literal["canvas"] = "canvas"
    request_id: str
    canvas: int
    token_ids: list[int]
    text: str
    steps: int


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    canvases: int
    denoising_steps: int
    tokens_per_forward: float


class Done(_Model):
    type: Literal["done"] = "done"
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "stop_string"]
    usage: Usage


class Error(_Model):
    type: Literal["error"] = "error"
    request_id: str
    code: str
    message: str


Event = Annotated[Queued | Restarted | Step | Canvas | Done | Error, Field(discriminator="type")]
_event_adapter: TypeAdapter[Any] = TypeAdapter(Event)
FINAL_TYPES = frozenset({"done", "error"})


def encode(model: BaseModel) -> str:
    return model.model_dump_json()


def decode_event(raw: str | bytes) -> Queued | Restarted | Step | Canvas | Done | Error:
    return _event_adapter.validate_json(raw)


def decode_job(raw: str | bytes) -> Job:
    return Job.model_validate_json(raw)


class ModelInfo(_Model):
    """What a worker serves, published with its heartbeat."""

    name: str
    canvas_length: int
    max_context: int
    max_batch: int


class WorkerInfo(_Model):
    worker_id: str
    model: ModelInfo
    started_at: float
    active: int = 0
    pending: int = 0
    steps: int = 0
    draining: bool = False


def encode_json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
