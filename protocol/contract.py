"""The Redis contract between the gateway and the workers.

This module alone spells key names, payload models and their encoding; both sides import it.
Every key written here has an expiry. Streams of requests are kept small instead: a job's entry is deleted when
it is acknowledged, and entries older than `REQUEST_STREAM_MAX_AGE_S` are trimmed (XADD MINID, by Redis's clock).

    dg:requests:{model}      stream  jobs for a model; consumer group `workers`
    dg:events:{request_id}   stream  events of one request (queued/restarted/step/canvas/done/error)
    dg:cancels               stream  request ids to cancel, read by every worker (broadcast)
    dg:request:{request_id}  hash    status of an accepted request (owner, attempts, tenant)
    dg:idem:{tenant}:{hash}  string  a caller's Idempotency-Key -> request id and body fingerprint
    dg:worker:{worker_id}    string  heartbeat (JSON WorkerInfo)
    dg:deadletter            stream  requests that failed `max_attempts` times
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from enum import StrEnum
from string import Template
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

PREFIX = "dg"
GROUP = "workers"
EVENT_FIELD = "e"
JOB_FIELD = "job"
CANCEL_FIELD = "request_id"  # of a dg:cancels entry
REASON_FIELD = "reason"  # of a dg:deadletter entry, beside JOB_FIELD
# fields of a request hash (formatted into the Lua scripts below)
STATUS_FIELD = "status"  # a Status
CANCEL_REQUESTED_FIELD = "status_requested"  # CANCEL_REQUESTED once a client asked to cancel (any status)
CANCEL_REQUESTED = "cancel"
MODEL_FIELD = "model"
ATTEMPTS_FIELD = "attempts"  # how many times a worker took it
CREATED_AT_FIELD = "created_at"
TENANT_FIELD = "tenant"  # the caller that submitted it (service.identity)
WORKER_FIELD = "worker"  # the worker that took it last
HANDED_BACK = "handed-back"  # the consumer a draining worker gives its jobs back to, for others to reclaim at once

EVENTS_TTL_S = 3600  # a client may reconnect and replay for an hour
REQUEST_TTL_S = 24 * 3600
IDEMPOTENCY_TTL_S = EVENTS_TTL_S  # a key never outlives the events that answer its replays
HEARTBEAT_TTL_S = 15
CANCEL_STREAM_MAXLEN = 10_000
DEADLETTER_MAXLEN = 10_000
REQUEST_STREAM_MAX_AGE_S = REQUEST_TTL_S  # past any request's queue time and running deadline


class Status(StrEnum):
    """A request's status (its hash's STATUS_FIELD)."""

    QUEUED = "queued"  # accepted, waiting for a worker
    RUNNING = "running"  # a worker took it
    DONE = "done"
    ERROR = "error"
    CANCELLED = "cancelled"


FINAL_STATUSES = frozenset({Status.DONE, Status.ERROR, Status.CANCELLED})
# The only moves a request's status makes, and who makes them. The Lua scripts below refuse any other.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    # TAKE_LUA; TIMEOUT_LUA (still queued at its deadline) or a worker failing it at take; a cancel seen at take
    Status.QUEUED: frozenset({Status.RUNNING, Status.ERROR, Status.CANCELLED}),
    # taken again (its worker died: TAKE_LUA); its final event (PUBLISH_LUA) or a worker failing it at take
    Status.RUNNING: frozenset({Status.RUNNING, Status.DONE, Status.ERROR, Status.CANCELLED}),
    Status.DONE: frozenset(),
    Status.ERROR: frozenset(),
    Status.CANCELLED: frozenset(),
}


def may_move(current: str | None, to: str) -> bool:
    """Whether a request in status `current` (None: no status kept) may move to `to`."""
    return current is None or to in TRANSITIONS[Status(current)]


class Take(StrEnum):
    """A worker's verdict on a job it read (TAKE_LUA)."""

    RUN = "run"
    CANCEL = "cancel"  # cancelled while it waited: end it as cancelled
    SKIP = "skip"  # it already ended (timed out, cancelled, or finished by an earlier owner)


# error codes both sides give (an Error event's `code`) where a rule of this module decides
CANCELLED = "cancelled"
TIMEOUT = "timeout"  # no worker took the request before its deadline


def request_stream(model: str) -> str:
    return f"{PREFIX}:requests:{model}"


def events_key(request_id: str) -> str:
    return f"{PREFIX}:events:{request_id}"


def request_key(request_id: str) -> str:
    return f"{PREFIX}:request:{request_id}"


def idempotency_key(tenant: str, key: str) -> str:
    """Scoped to the caller (`tenant`, never an API key itself); the client's key is hashed (any length, any
    characters)."""
    return f"{PREFIX}:idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}"


WORKER_PATTERN = f"{PREFIX}:worker:*"
CANCELS = f"{PREFIX}:cancels"
DEADLETTER = f"{PREFIX}:deadletter"


# --------------------------------------------------------- connection policy
# Both sides connect the same way. A command that meets a dead connection (Redis restarted; a pooled socket gone
# stale) is retried on a fresh connection with backoff before any caller sees an error, so a Redis that is back
# costs no request. Only connection errors are retried: a timeout may have run the command. Every script is
# safe to run twice (SUBMIT_LUA checks the request hash first).
REDIS_RETRIES = 3


def client_options(asynchronous: bool, blocking: bool = False) -> dict[str, Any]:
    """Keyword arguments for `Redis.from_url`; `blocking` clients (XREAD BLOCK) have no socket timeout."""
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.retry import Retry

    backoff = ExponentialWithJitterBackoff(base=0.05, cap=1.0)
    errors = (RedisConnectionError, ConnectionError)
    retry = (AsyncRetry if asynchronous else Retry)(backoff, REDIS_RETRIES, supported_errors=errors)
    return {"socket_connect_timeout": 2, "socket_timeout": None if blocking else 10, "socket_keepalive": True,
            "health_check_interval": 10, "retry": retry, "retry_on_error": list(errors)}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------ sampling
# transformers' DiffusionGemmaGenerationConfig defaults, used where a checkpoint sets nothing
REFERENCE_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 256,
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


def _read(source: Any, key: str) -> Any:
    """`key` of a mapping (a JSON file read) or an attribute of an object (transformers' config classes)."""
    if source is None:
        return None
    return source.get(key) if isinstance(source, Mapping) else getattr(source, key, None)


def sampling_defaults(generation_config: Any) -> dict[str, Any]:
    """The sampler's defaults of a checkpoint: its `generation_config.json` (as a dict) or transformers'
    `DiffusionGemmaGenerationConfig`, the reference's own defaults where it sets nothing. The entropy bound is
    read from its `sampler_config` (an `EntropyBoundSamplerConfig` or its dict), as the reference does."""
    defaults = dict(REFERENCE_DEFAULTS)
    for key in REFERENCE_DEFAULTS:
        if (value := _read(generation_config, key)) is not None:
            defaults[key] = value
    bound = _read(_read(generation_config, "sampler_config"), "entropy_bound")
    if bound is not None:
        defaults["entropy_bound"] = bound
    return defaults


def eos_token_ids(generation_config: Any, model_config: Any = None) -> tuple[int, ...]:
    """The EOS ids a request stops at: the generation config's `eos_token_id`, else the model config's text
    config's (one id or a list; none: no EOS stop)."""
    eos = _read(generation_config, "eos_token_id")
    if eos is None:
        eos = _read(_read(model_config, "text_config"), "eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list | tuple) else (int(eos),)


def default_sampling(generation_config: Any, *, seed: int, **overrides: Any) -> Sampling:
    """A request's parameters from a checkpoint's generation config: its defaults and EOS ids, with `overrides`
    (any field of `Sampling`) on top."""
    values = {**sampling_defaults(generation_config), "eos_token_ids": eos_token_ids(generation_config)}
    return Sampling(**{**values, **overrides, "seed": seed})


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

    @model_validator(mode="after")
    def _schedule(self) -> Sampling:
        if (problem := temperature_problem(self.t_min, self.t_max)) is not None:
            raise ValueError(problem)
        return self


def temperature_problem(t_min: float, t_max: float) -> str | None:
    """Why t_max down to t_min is no temperature schedule (None: it is one). The gateway names the field with it
    before a job exists; a job never holds another."""
    if t_max > t_min:
        return None
    return f"t_max ({t_max}) must be greater than t_min ({t_min})"


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
    # the running deadline (per attempt): a job past either ends with a `deadline_exceeded` error
    max_steps: int | None = None  # denoising steps, over all its canvases
    max_running_s: float | None = None  # seconds since a worker took it

    def past_queue_deadline(self, attempt: int = 1, now: float | None = None) -> bool:
        """Whether the job waited in the queue past its deadline at its `attempt`-th take (a job taken again
        after its worker died has run: no longer). Either side ends such a job with `queue_timeout`: the gateway
        at the deadline (TIMEOUT_LUA), a worker that takes it later."""
        return attempt <= 1 and self.deadline is not None and (time.time() if now is None else now) > self.deadline


def queue_timeout(request_id: str) -> Error:
    """The error of a request no worker took before its deadline."""
    return Error(request_id=request_id, code=TIMEOUT, message="no worker took the request before its deadline")


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
    draft_ids: list[int]  # the argmax draft of every canvas position
    draft_text: str  # the draft decoded as a whole
    draft_tokens: list[str] = []  # each position's token, decoded alone (for per-position views)
    accepted: int  # positions kept (not renoised) at this step
    accepted_mask: list[int] = []  # 1 where a position was kept
    mean_entropy: float
    entropy: list[float] = []  # per position, rounded to 4 decimals


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
    tokens_per_forward: float  # completion tokens per denoising step

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, canvases: int, denoising_steps: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, canvases=canvases,
                   denoising_steps=denoising_steps,
                   tokens_per_forward=round(completion_tokens / max(denoising_steps, 1), 4))

    @classmethod
    def total(cls, usages: Sequence[Usage]) -> Usage:
        """The usage of several samples of one prompt (n > 1): the prompt counted once, the rest summed."""
        return cls.of(usages[0].prompt_tokens, sum(u.completion_tokens for u in usages),
                      sum(u.canvases for u in usages), sum(u.denoising_steps for u in usages))


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


def final_status(event: Done | Error) -> Status:
    """The request status a final event leaves (the request hash's STATUS_FIELD)."""
    if event.type == "done":
        return Status.DONE
    return Status.CANCELLED if event.code == CANCELLED else Status.ERROR


class RawEvent:
    """An event as it travels: its JSON, and its type read without parsing the whole of it.

    Relays (the gateway's WebSocket and SSE paths) forward `text` as it is; `parse()` gives the model.
    """

    __slots__ = ("raw", "type", "_parsed")

    def __init__(self, raw: bytes):
        self.raw = raw
        self.type = event_type(raw)
        self._parsed = None

    @property
    def text(self) -> str:
        return self.raw.decode()

    def parse(self) -> Queued | Restarted | Step | Canvas | Done | Error:
        if self._parsed is None:
            self._parsed = decode_event(self.raw)
        return self._parsed


_TYPE_PREFIX = b'{"type":"'


def event_type(raw: bytes) -> str:
    """Every event model declares `type` first, so its JSON starts with it."""
    if raw.startswith(_TYPE_PREFIX):
        end = raw.find(b'"', len(_TYPE_PREFIX))
        return raw[len(_TYPE_PREFIX):end].decode()
    return str(json.loads(raw).get("type"))


def encode(model: BaseModel) -> str:
    return model.model_dump_json()


def decode_event(raw: str | bytes) -> Queued | Restarted | Step | Canvas | Done | Error:
    return _event_adapter.validate_json(raw)


def decode_job(raw: str | bytes) -> Job:
    return Job.model_validate_json(raw)


def context_needed(prompt_tokens: int, max_new_tokens: int, canvas_length: int) -> int:
    """Context positions a request needs on a worker: its prompt and its canvases, whole (`ModelInfo.max_context`
    must hold them)."""
    return prompt_tokens + math.ceil(max_new_tokens / canvas_length) * canvas_length


class IdempotencyRecord(_Model):
    """What an Idempotency-Key names: the request it started and the fingerprint of that request's body."""

    request_id: str
    fingerprint: str


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



# ------------------------------------------------------------ Lua scripts
# Every key name, field and status below is formatted in from the names above ($name), never spelled here.
def _lua_table(transitions: dict[Status, frozenset[Status]]) -> str:
    """TRANSITIONS as a Lua table: {['queued'] = {['running'] = true, ...}, ...}."""
    def row(to: frozenset[Status]) -> str:
        return "{" + ", ".join(f"['{b}'] = true" for b in sorted(to)) + "}"

    return "{" + ", ".join(f"['{a}'] = {row(to)}" for a, to in transitions.items()) + "}"


_NAMES = {
    "status": STATUS_FIELD, "cancel_requested_field": CANCEL_REQUESTED_FIELD, "cancel_requested": CANCEL_REQUESTED,
    "model": MODEL_FIELD, "attempts": ATTEMPTS_FIELD, "created_at": CREATED_AT_FIELD, "tenant": TENANT_FIELD,
    "worker": WORKER_FIELD, "event": EVENT_FIELD, "job": JOB_FIELD, "transitions": _lua_table(TRANSITIONS),
    **{status.name.lower(): status.value for status in Status}, **{f"take_{t.name.lower()}": t.value for t in Take},
}


def _lua(*parts: str) -> str:
    return Template("".join(parts)).substitute(_NAMES)


# `move(hash, to)`: set a request's status if TRANSITIONS allows it from the present one (none kept: any).
_MOVE = """
local ALLOWED = $transitions
local function move(hash, to)
  local from = redis.call('HGET', hash, '$status')
  if from and not (ALLOWED[from] or {})[to] then return false end
  redis.call('HSET', hash, '$status', to)
  return true
end
"""

# `last`: the id of the last entry delivered to the group ARGV[1] on stream KEYS[1] ('0-0' if none).
_LAST_DELIVERED = """
local last = '0-0'
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if ok then
  for _, g in ipairs(groups) do
    local name, id
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then id = g[i + 1] end
    end
    if name == ARGV[1] then last = id end
  end
end
"""

# Atomic admission: refuse past `max_depth` requests waiting (not yet delivered to a worker), else record
# the request (with its caller's tenant), write its `queued` event, then queue the job. Works on Redis 6.2
# (no XINFO `lag` there). Safe to retry: a request already recorded is not queued twice. With an idempotency
# key (KEYS[4]), a key already taken returns its record instead, and an accepted request takes the key.
# KEYS: request stream, request hash, events stream, [idempotency key]
# ARGV: group, max_depth, job, queued event, created_at, model, request ttl, events ttl, stream max age s,
#       tenant, idempotency record, idempotency ttl
# Returns {1, waiting} accepted, {0, waiting} refused, {2, record} the idempotency key's earlier request.
SUBMIT_LUA = _lua(_LAST_DELIVERED, """
if KEYS[4] then
  local taken = redis.call('GET', KEYS[4])
  if taken then return {2, taken} end
end
if redis.call('EXISTS', KEYS[2]) == 1 then return {1, -1} end
local max_depth = tonumber(ARGV[2])
local waiting = #redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', max_depth)
if waiting >= max_depth then return {0, waiting} end
redis.call('HSET', KEYS[2], '$status', '$queued', '$model', ARGV[6], '$attempts', 0, '$created_at', ARGV[5],
           '$tenant', ARGV[10])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[7]))
redis.call('XADD', KEYS[3], '*', '$event', ARGV[4])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[8]))
local now = redis.call('TIME')
local min_id = string.format('%d-0', (tonumber(now[1]) - tonumber(ARGV[9])) * 1000)
redis.call('XADD', KEYS[1], 'MINID', min_id, '*', '$job', ARGV[3])
if KEYS[4] then redis.call('SET', KEYS[4], ARGV[11], 'EX', tonumber(ARGV[12])) end
return {1, waiting}
""")

# Requests waiting in a stream, counted up to a cap (Redis 6.2 has no XINFO `lag`).
# KEYS: request stream. ARGV: group, cap
WAITING_LUA = _lua(_LAST_DELIVERED, """
return #redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', tonumber(ARGV[2]))
""")

# A worker writes a request's events only while it still owns the job (a reclaimed job's old owner must
# never interleave its steps with the new owner's). Final events also set the status, acknowledge the job and
# delete its entry (a request stream holds only waiting and running jobs).
# KEYS: request stream, then per request: its events stream, its request hash
# ARGV: group, consumer, events ttl, n, then per request: entry id, final status or '', count, events...
# Returns the entry ids this worker no longer owns.
PUBLISH_LUA = _lua(_MOVE, """
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local ttl, n = tonumber(ARGV[3]), tonumber(ARGV[4])
local a, lost = 5, {}
for i = 1, n do
  local events, hash = KEYS[2 * i], KEYS[2 * i + 1]
  local entry, final, count = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  if #redis.call('XPENDING', stream, group, entry, entry, 1, consumer) > 0 then
    for j = 0, count - 1 do redis.call('XADD', events, '*', '$event', ARGV[a + j]) end
    redis.call('EXPIRE', events, ttl)
    if final ~= '' then
      move(hash, final)
      redis.call('XACK', stream, group, entry)
      redis.call('XDEL', stream, entry)
    end
  else
    table.insert(lost, entry)
  end
  a = a + count
end
return lost
""")

# Renew the leases of jobs this worker still owns (reset their idle time); report the ones it lost.
# KEYS: request stream. ARGV: group, consumer, entry ids...
RENEW_LUA = """
local lost = {}
for i = 3, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""

# Reclaim jobs whose worker went silent (idle past the lease), except those this process runs itself: a
# worker that froze past its lease and woke up keeps what it runs, never takes it over a second time.
# Entries trimmed away while pending cannot be run: they are acknowledged.
# KEYS: request stream. ARGV: group, consumer, min idle ms, count, entry ids held here...
# Returns the claimed entries, as XCLAIM gives them.
RECLAIM_LUA = """
local held = {}
for i = 5, #ARGV do held[ARGV[i]] = true end
local want = tonumber(ARGV[4])
local out = {}
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', want + #ARGV - 4)
for _, p in ipairs(pending) do
  if #out >= want then break end
  if not held[p[1]] then
    local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], p[1])
    if claimed[1] then
      table.insert(out, claimed[1])
    else
      redis.call('XACK', KEYS[1], ARGV[1], p[1])
    end
  end
end
return out
"""

# A worker takes a job: skip it if its status may no longer become running (it ended), end it if it was
# cancelled while queued, else mark it running here. Atomic against the gateway's queue timeout (TIMEOUT_LUA).
# KEYS: request hash. ARGV: worker id. Returns {verdict, attempts}: a Take.
TAKE_LUA = _lua(_MOVE, """
local status = redis.call('HGET', KEYS[1], '$status')
if status and not (ALLOWED[status] or {})['$running'] then return {'$take_skip', 0} end
local attempts = redis.call('HINCRBY', KEYS[1], '$attempts', 1)
if redis.call('HGET', KEYS[1], '$cancel_requested_field') == '$cancel_requested' then
  return {'$take_cancel', attempts}
end
move(KEYS[1], '$running')
redis.call('HSET', KEYS[1], '$worker', ARGV[1])
return {'$take_run', attempts}
""")

# The gateway ends a request that is still queued past its deadline (no worker took it in time).
# KEYS: request hash, events stream. ARGV: the error event, events ttl. Returns 1 if it ended it.
TIMEOUT_LUA = _lua(_MOVE, """
if redis.call('HGET', KEYS[1], '$status') ~= '$queued' then return 0 end
move(KEYS[1], '$error')
redis.call('XADD', KEYS[2], '*', '$event', ARGV[1])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
return 1
""")
