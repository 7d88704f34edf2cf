"""A typed Python client for a dgserve service: sync (`Client`) and async (`AsyncClient`).

    from dgserve.client import Client

    with Client("http://127.0.0.1:8000") as client:
        completion = client.generate("In the beginning", max_new_tokens=64, seed=1)
        print(completion.text, completion.usage.denoising_steps)

        with client.stream("In the beginning", max_new_tokens=64) as stream:
            for event in stream:          # Queued, Step (every denoising step), Canvas, Done | Error
                ...
        print(stream.result.text)

`generate` is `POST /generate`; `stream` is one request over `WS /ws/generate` (its own connection), every
event typed with the models of `protocol.contract`. Errors raise a `DgError` subclass: `ValidationError`
(422, naming the field), `Overloaded` (429), `Unavailable` (503), `AuthError` (401), `RequestFailed` (a
request that ended with an error, with its `code`), `ServiceUnreachable` (nothing answers at the URL),
`RequestTimeout`. `retries=` retries 429 and 503 after their Retry-After (off by default).

The sync client needs no event loop (httpx + `websockets.sync.client`); the async one runs on the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any, Literal, TypedDict, Unpack

import httpx
import websockets
import websockets.asyncio.client as ws_async
import websockets.sync.client as ws_sync
from pydantic import BaseModel, ConfigDict

from protocol.contract import Canvas, Done, Error, Queued, Restarted, Step, Usage
from protocol.sudoku import canvas_cells, draft_grid, is_valid_solution, normalize_puzzle, problems

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 300.0  # seconds: a whole POST /generate, or the longest wait between two streamed events
CONNECT_TIMEOUT = 10.0
MAX_RETRY_WAIT = 60.0  # a Retry-After above this is capped

Event = Queued | Restarted | Step | Canvas | Done | Error
_EVENT_TYPES: dict[str, type[BaseModel]] = {
    "queued": Queued, "restarted": Restarted, "step": Step, "canvas": Canvas, "done": Done, "error": Error,
}


# ============================================================================================ errors
class DgError(Exception):
    """Any failure of a dgserve call. `status` is the HTTP status where there was one, `code` the
    service's error code (`cancelled`, `timeout`, `overloaded`, ...) where it gave one."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 request_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.request_id = request_id


class ValidationError(DgError):
    """The service refused the request's input (422, or a `validation_error` event): `field` names the
    first offending field (None when the problem is the request as a whole), `errors` lists them all as
    `{"field", "message"}`."""

    def __init__(self, message: str, *, field: str | None = None, errors: list[dict[str, Any]] | None = None,
                 status: int | None = 422, code: str | None = "validation_error", request_id: str | None = None):
        super().__init__(message, status=status, code=code, request_id=request_id)
        self.field = field
        self.errors = errors if errors is not None else [{"field": field, "message": message}]


class Overloaded(DgError):
    """The queue is full (429): retry after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any):
        kw.setdefault("code", "overloaded")
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Unavailable(DgError):
    """The service cannot queue work right now (503, Redis unreachable): retry after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any):
        kw.setdefault("code", "unavailable")
        super().__init__(message, **kw)
        self.retry_after = retry_after


class AuthError(DgError):
    """Missing or invalid API key (401)."""


class RequestFailed(DgError):
    """A request the service accepted ended with an error: `code` is `cancelled`, `timeout`, ..."""


class ServiceUnreachable(DgError):
    """Nothing answers at the service URL (connection refused, unknown host, ...)."""

    def __init__(self, message: str, *, url: str, reason: str = ""):
        super().__init__(message)
        self.url = url
        self.reason = reason  # "connection refused", or the underlying error's name


class RequestTimeout(DgError):
    """No answer (or no streamed event) within the client's `timeout`."""


# ============================================================================================ results
def _known(model: type[BaseModel], data: Mapping[str, Any]) -> dict[str, Any]:
    """Only the fields `model` declares: a newer service may add fields without breaking this client."""
    return {k: v for k, v in data.items() if k in model.model_fields}


def _usage(data: Any) -> Any:
    return Usage.model_validate(_known(Usage, data)) if isinstance(data, Mapping) else data


class Completion(BaseModel):
    """The answer of `generate` (POST /generate)."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "stop_string"]
    usage: Usage

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Completion:
        return cls.model_validate({**_known(cls, data), "usage": _usage(data.get("usage"))})


class SudokuResult(BaseModel):
    """A solved (or not) Sudoku: `solution` is 81 characters, `valid` the verdict of `is_valid_solution`,
    `problems` why not (in words), `steps` the denoising steps used. Fields the service adds are kept as
    attributes."""

    model_config = ConfigDict(frozen=True, extra="allow")

    request_id: str
    puzzle: str
    solution: str
    valid: bool
    problems: list[str] = []
    steps: int | None = None
    model: str | None = None
    usage: Usage | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SudokuResult:
        data = dict(data)
        if "usage" in data:
            data["usage"] = _usage(data["usage"])
        return cls.model_validate(data)


def parse_event(data: Mapping[str, Any]) -> Event:
    """A WebSocket event (decoded JSON) as its `protocol.contract` model; unknown fields are dropped."""
    model = _EVENT_TYPES.get(str(data.get("type")))
    if model is None:
        raise DgError(f"unknown event type {data.get('type')!r}")
    return model.model_validate(_known(model, data))  # type: ignore[return-value]


# ============================================================================================ requests
class GenerateParams(TypedDict, total=False):
    """Optional fields of a generation (None or absent: the checkpoint's default)."""

    model: str
    max_new_tokens: int
    max_denoising_steps: int
    entropy_bound: float
    t_min: float
    t_max: float
    stability_threshold: int
    confidence_threshold: float
    seed: int
    template: str | Sequence[int | None]
    template_hole: str


def generate_body(prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None,
                  **params: Unpack[GenerateParams]) -> dict[str, Any]:
    """The JSON body of POST /generate (and of a WebSocket `generate` message, less `type`)."""
    unknown = sorted(set(params) - set(GenerateParams.__annotations__))
    if unknown:
        raise TypeError(f"unknown generation parameter(s) {', '.join(unknown)}; "
                        f"known: {', '.join(GenerateParams.__annotations__)}")
    body: dict[str, Any] = {}
    if prompt is not None:
        body["prompt"] = prompt
    if messages is not None:
        body["messages"] = [dict(m) for m in messages]
    for key, value in params.items():
        if value is not None:
            body[key] = list(value) if key == "template" and not isinstance(value, str) else value
    return body


def sudoku_stream_body(puzzle: str, seed: int | None = None, model: str = "sudoku",
                       **params: Unpack[GenerateParams]) -> dict[str, Any]:
    """A Sudoku as a generation: the puzzle (0 = blank) is the prompt and the canvas template, `0` its hole;
    the canvas is the 81 solution digits."""
    grid = _puzzle(puzzle)
    merged: dict[str, Any] = {"max_new_tokens": 81, **params, "model": model, "seed": seed,
                              "template": grid, "template_hole": "0"}
    return generate_body(grid, **merged)


def _puzzle(puzzle: str) -> str:
    try:
        return normalize_puzzle(puzzle)
    except ValueError as exc:
        raise ValidationError(str(exc), field="puzzle", status=None) from None


def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


def _ws_url(base_url: str) -> str:
    parts = urllib.parse.urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {base_url!r}")
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws/generate", "", ""))


def _auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# ============================================================================================ error mapping
def _retry_after(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        pass
    try:
        return max(0.0, parsedate_to_datetime(str(value)).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _field(loc: Sequence[Any]) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or None


def _validation(errors: list[dict[str, Any]], status: int | None, request_id: str | None = None) -> ValidationError:
    message = "; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors)
    return ValidationError(message or "invalid request", field=errors[0]["field"] if errors else None,
                           errors=errors, status=status, request_id=request_id)


def error_from_http(status: int, headers: Mapping[str, str], body: bytes | str) -> DgError:
    """The exception for an HTTP error answer of the service (or a refused WebSocket handshake)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    data = data if isinstance(data, dict) else {}
    detail, code, rid = data.get("detail"), data.get("code"), data.get("request_id")
    message = detail if isinstance(detail, str) else (text.strip()[:500] or f"HTTP {status}")
    lower = {k.lower(): v for k, v in headers.items()}
    retry = _retry_after(lower.get("retry-after"))
    if status in (401, 403):
        return AuthError(message, status=status, code=code, request_id=rid)
    if status == 422:
        if isinstance(detail, list):
            errors = [{"field": _field(e.get("loc") or ()), "message": str(e.get("msg", e))}
                      if isinstance(e, dict) else {"field": None, "message": str(e)} for e in detail]
            return _validation(errors, status, rid)
        return ValidationError(message, status=status, code=code or "validation_error", request_id=rid)
    if status == 429:
        return Overloaded(message, retry_after=retry, status=status, request_id=rid)
    if status == 503:
        return Unavailable(message, retry_after=retry, status=status, request_id=rid)
    if code:
        return RequestFailed(message, status=status, code=code, request_id=rid)
    return DgError(f"HTTP {status}: {message}", status=status, request_id=rid)


def error_from_event(data: Mapping[str, Any]) -> DgError:
    """The exception for an `error` event (a refused message, or a request that failed)."""
    code = str(data.get("code") or "error")
    message = str(data.get("message") or code)
    rid = data.get("request_id")
    if code == "validation_error":  # "field: message; field: message" (a message may hold "; " too)
        errors: list[dict[str, Any]] = []
        for part in message.split("; "):
            name, sep, msg = part.partition(": ")
            if sep and name.split(".")[0] in _MESSAGE_FIELDS:
                errors.append({"field": None if name == "message" else name, "message": msg})
            elif errors:
                errors[-1]["message"] += "; " + part
            else:
                errors.append({"field": None, "message": part})
        return _validation(errors, None, rid)
    if code == "overloaded":
        return Overloaded(message, retry_after=_retry_after(data.get("retry_after")), request_id=rid)
    if code == "unavailable":
        return Unavailable(message, retry_after=_retry_after(data.get("retry_after")), request_id=rid)
    if code in ("unauthorized", "auth_error"):
        return AuthError(message, code=code, request_id=rid)
    return RequestFailed(message, code=code, request_id=rid)


_MESSAGE_FIELDS = {*GenerateParams.__annotations__, "prompt", "messages", "type", "ref", "request_id", "message"}


def _retry_wait(exc: BaseException, attempt: int, retries: int) -> float | None:
    """Seconds to wait before retrying after `exc`, or None when it is not retried."""
    if attempt >= retries or not isinstance(exc, Overloaded | Unavailable):
        return None
    return min(exc.retry_after if exc.retry_after is not None else 1.0, MAX_RETRY_WAIT)


def _unreachable(url: str, exc: BaseException) -> ServiceUnreachable:
    text = str(exc).lower()
    if isinstance(exc, ConnectionRefusedError) or "refused" in text:
        reason = "connection refused"
    elif isinstance(exc, socket.gaierror) or "name or service not known" in text or "nodename" in text:
        reason = "unknown host"
    else:
        reason = str(exc) or exc.__class__.__name__
    return ServiceUnreachable(f"cannot reach the dgserve service at {url} ({reason})", url=url, reason=reason)


# ============================================================================================ streams
class _StreamState:
    """What a stream has seen, shared by the sync and async streams (no I/O here)."""

    def __init__(self, body: dict[str, Any], retries: int):
        self.ref = uuid.uuid4().hex[:16]
        self._message = {"type": "generate", **body, "ref": self.ref}
        self._retries = retries
        self.request_id: str | None = None
        self.queued: Queued | None = None
        self.result: Done | None = None  # the final Done, once the stream is over
        self.error: Error | None = None  # the final Error, if the request failed (cancelled, timeout, ...)
        self.canvases_done: list[Canvas] = []  # committed canvases (of the current attempt)
        self.draft: Step | None = None  # the latest step of the canvas being refined
        self.restarts = 0
        self.started_at: float | None = None
        self.elapsed: float | None = None  # seconds from sending the request to its final event
        self._buffer: deque[Event] = deque()
        self._finished = False
        self._cancel_pending = False

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
    def finished(self) -> bool:
        return self._finished

    @property
    def completion(self) -> Completion | None:
        """The final answer in the shape of `generate`'s, once done."""
        if self.result is None or self.queued is None:
            return None
        r = self.result
        return Completion(request_id=r.request_id, model=self.queued.model, text=r.text, token_ids=r.token_ids,
                          finish_reason=r.finish_reason, usage=r.usage)

    def _final(self) -> Done:
        if self.result is not None:
            return self.result
        if self.error is not None:
            e = self.error
            raise RequestFailed(e.message, code=e.code, request_id=e.request_id)
        raise DgError("the stream ended without a final event")

    def _on_queued_or_rejection(self, data: Mapping[str, Any]) -> Queued | None:
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

    def _on_event(self, data: Mapping[str, Any]) -> Event | None:
        """After `queued`: the typed event to hand out, or None (another request's, a late cancel reply, or a
        type this client does not know)."""
        if data.get("request_id") != self.request_id:
            return None
        if data.get("type") == "error" and data.get("code") == "unknown_request":
            return None  # our cancel arrived after the request had ended: its final event is already here
        if data.get("type") not in _EVENT_TYPES:
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
            if isinstance(event, Done):
                self.result = event
            else:
                self.error = event
            self._finished = True
            if self.started_at is not None:
                self.elapsed = time.monotonic() - self.started_at
        return event

    def _cancel_message(self, request_id: str | None) -> dict[str, Any] | None:
        rid = request_id or self.request_id
        if self._finished:
            return None
        if rid is None:
            self._cancel_pending = True  # sent as soon as the request is queued
            return None
        return {"type": "cancel", "request_id": rid}


class Stream(_StreamState):
    """One streamed request over its own WebSocket (sync). Iterate it for typed events; use it as a context
    manager (`with client.stream(...) as s:`) to own the connection: leaving the block closes it, which
    cancels the request if it is still running."""

    def __init__(self, client: Client, body: dict[str, Any]):
        super().__init__(body, client.retries)
        self._client = client
        self._ws: ws_sync.ClientConnection | None = None
        self._opened = False

    # -- connection
    def __enter__(self) -> Stream:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def open(self) -> Stream:
        """Connect and send the request; returns once it is queued (`request_id` set). Idempotent."""
        if self._opened:
            return self
        self._opened = True
        attempt = 0
        while True:
            try:
                self._connect()
                self.started_at = time.monotonic()
                self._send(self._message)
                while (queued := self._on_queued_or_rejection(self._recv())) is None:
                    pass
                break
            except DgError as exc:
                wait = _retry_wait(exc, attempt, self._retries)
                if wait is None:
                    self.close()
                    raise
                attempt += 1
                time.sleep(wait)
            except BaseException:
                self.close()
                raise
        self._buffer.append(queued)
        if self._cancel_pending:
            self.cancel()
        return self

    def _connect(self) -> None:
        if self._ws is not None:
            return
        c = self._client
        try:
            connection = ws_sync.connect(c.ws_url, additional_headers=_auth_headers(c.api_key), max_size=None,
                                         open_timeout=min(CONNECT_TIMEOUT, c.timeout))
            # entered as a context manager (websockets >= 17.1 deprecates using the connection directly);
            # `close` ends it
            self._ws = connection.__enter__()
        except websockets.exceptions.InvalidStatus as exc:
            r = exc.response
            raise error_from_http(r.status_code, dict(r.headers.raw_items()), r.body or b"") from None
        except TimeoutError as exc:
            raise RequestTimeout(f"no WebSocket handshake from {c.ws_url} within {CONNECT_TIMEOUT} s") from exc
        except (OSError, websockets.exceptions.InvalidHandshake) as exc:
            raise _unreachable(c.base_url, exc) from exc

    def _send(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        try:
            self._ws.send(json.dumps(message))
        except websockets.exceptions.ConnectionClosed as exc:
            raise DgError(f"the connection closed before the request finished ({exc})") from exc

    def _recv(self) -> dict[str, Any]:
        assert self._ws is not None
        try:
            raw = self._ws.recv(timeout=self._client.timeout)
        except TimeoutError:
            raise RequestTimeout(f"no event from the service within {self._client.timeout} s",
                                 request_id=self.request_id) from None
        except websockets.exceptions.ConnectionClosed as exc:
            raise DgError(f"the connection closed before the request finished ({exc})",
                          request_id=self.request_id) from exc
        return json.loads(raw)

    def close(self) -> None:
        """Close the connection (the service cancels the request if it is still running)."""
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.close()

    # -- events
    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Event:
        if not self._opened:
            self.open()
        if self._buffer:
            return self._buffer.popleft()
        if self._finished or self._ws is None:
            raise StopIteration
        while True:
            event = self._on_event(self._recv())
            if event is not None:
                if self._finished:
                    self.close()
                return event

    def steps(self) -> Iterator[Step]:
        """Only the `Step` events (every denoising step), to the end of the request."""
        return (e for e in self if isinstance(e, Step))

    def canvases(self) -> Iterator[Canvas]:
        """Only the committed `Canvas` events, to the end of the request."""
        return (e for e in self if isinstance(e, Canvas))

    def wait(self) -> Done:
        """Read to the end; the final `Done`, or `RequestFailed` if the request ended with an error."""
        for _ in self:
            pass
        return self._final()

    def cancel(self, request_id: str | None = None) -> None:
        """Ask the service to cancel the request; its `Error` (code `cancelled`) follows in the stream."""
        message = self._cancel_message(request_id)
        if message is not None and self._ws is not None:
            self._send(message)


class AsyncStream(_StreamState):
    """One streamed request over its own WebSocket (async). `async for event in stream`; use
    `async with client.stream(...) as s:` to own the connection (leaving the block closes it)."""

    def __init__(self, client: AsyncClient, body: dict[str, Any]):
        super().__init__(body, client.retries)
        self._client = client
        self._ws: ws_async.ClientConnection | None = None
        self._opened = False

    async def __aenter__(self) -> AsyncStream:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> AsyncStream:
        """Connect and send the request; returns once it is queued (`request_id` set). Idempotent."""
        if self._opened:
            return self
        self._opened = True
        attempt = 0
        while True:
            try:
                await self._connect()
                self.started_at = time.monotonic()
                await self._send(self._message)
                while (queued := self._on_queued_or_rejection(await self._recv())) is None:
                    pass
                break
            except DgError as exc:
                wait = _retry_wait(exc, attempt, self._retries)
                if wait is None:
                    await self.close()
                    raise
                attempt += 1
                await asyncio.sleep(wait)
            except BaseException:
                await self.close()
                raise
        self._buffer.append(queued)
        if self._cancel_pending:
            await self.cancel()
        return self

    async def _connect(self) -> None:
        if self._ws is not None:
            return
        c = self._client
        try:
            self._ws = await ws_async.connect(c.ws_url, additional_headers=_auth_headers(c.api_key), max_size=None,
                                              open_timeout=min(CONNECT_TIMEOUT, c.timeout))
        except websockets.exceptions.InvalidStatus as exc:
            r = exc.response
            raise error_from_http(r.status_code, dict(r.headers.raw_items()), r.body or b"") from None
        except TimeoutError as exc:
            raise RequestTimeout(f"no WebSocket handshake from {c.ws_url} within {CONNECT_TIMEOUT} s") from exc
        except (OSError, websockets.exceptions.InvalidHandshake) as exc:
            raise _unreachable(c.base_url, exc) from exc

    async def _send(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        try:
            await self._ws.send(json.dumps(message))
        except websockets.exceptions.ConnectionClosed as exc:
            raise DgError(f"the connection closed before the request finished ({exc})") from exc

    async def _recv(self) -> dict[str, Any]:
        assert self._ws is not None
        try:
            async with asyncio.timeout(self._client.timeout):
                raw = await self._ws.recv()
        except TimeoutError:
            raise RequestTimeout(f"no event from the service within {self._client.timeout} s",
                                 request_id=self.request_id) from None
        except websockets.exceptions.ConnectionClosed as exc:
            raise DgError(f"the connection closed before the request finished ({exc})",
                          request_id=self.request_id) from exc
        return json.loads(raw)

    async def close(self) -> None:
        """Close the connection (the service cancels the request if it is still running)."""
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Event:
        if not self._opened:
            await self.open()
        if self._buffer:
            return self._buffer.popleft()
        if self._finished or self._ws is None:
            raise StopAsyncIteration
        while True:
            event = self._on_event(await self._recv())
            if event is not None:
                if self._finished:
                    await self.close()
                return event

    async def steps(self) -> AsyncIterator[Step]:
        """Only the `Step` events (every denoising step), to the end of the request."""
        async for e in self:
            if isinstance(e, Step):
                yield e

    async def canvases(self) -> AsyncIterator[Canvas]:
        """Only the committed `Canvas` events, to the end of the request."""
        async for e in self:
            if isinstance(e, Canvas):
                yield e

    async def wait(self) -> Done:
        """Read to the end; the final `Done`, or `RequestFailed` if the request ended with an error."""
        async for _ in self:
            pass
        return self._final()

    async def cancel(self, request_id: str | None = None) -> None:
        """Ask the service to cancel the request; its `Error` (code `cancelled`) follows in the stream."""
        message = self._cancel_message(request_id)
        if message is not None and self._ws is not None:
            await self._send(message)


class _SudokuView:
    """The Sudoku reading of a stream: the grid as it converges, and the verdict once done."""

    puzzle: str
    draft: Step | None
    result: Done | None
    request_id: str | None
    queued: Queued | None

    @property
    def grid(self) -> str:
        """81 display cells: the givens, and the latest draft's digits elsewhere (`.` for a non-digit)."""
        if self.draft is None:
            return draft_grid(self.puzzle, "")
        return draft_grid(self.puzzle, self.draft.draft_text, self.draft.draft_ids)

    @property
    def sudoku_result(self) -> SudokuResult | None:
        """The `SudokuResult` (checked here with `is_valid_solution`) once the request is done."""
        if self.result is None or self.request_id is None:
            return None
        solution = canvas_cells(self.puzzle, self.result.text, self.result.token_ids)
        valid = is_valid_solution(self.puzzle, solution)
        return SudokuResult(request_id=self.request_id, puzzle=self.puzzle, solution=solution, valid=valid,
                            problems=[] if valid else problems(self.puzzle, solution, limit=20),
                            steps=self.result.usage.denoising_steps, model=self.queued.model if self.queued else None,
                            usage=self.result.usage)


class SudokuStream(_SudokuView, Stream):
    """A streamed Sudoku (sync): every step's `draft_text` is the 81-cell grid."""

    def __init__(self, client: Client, puzzle: str, body: dict[str, Any]):
        Stream.__init__(self, client, body)
        self.puzzle = puzzle


class AsyncSudokuStream(_SudokuView, AsyncStream):
    """A streamed Sudoku (async): every step's `draft_text` is the 81-cell grid."""

    def __init__(self, client: AsyncClient, puzzle: str, body: dict[str, Any]):
        AsyncStream.__init__(self, client, body)
        self.puzzle = puzzle


# ============================================================================================ clients
class _ClientBase:
    def __init__(self, base_url: str, api_key: str | None, timeout: float, retries: int):
        self.base_url = _base_url(base_url)
        self.ws_url = _ws_url(self.base_url)
        self.api_key = api_key
        self.timeout = float(timeout)
        self.retries = int(retries)

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, connect=min(CONNECT_TIMEOUT, self.timeout))

    def _map_transport(self, exc: httpx.TransportError) -> DgError:
        if isinstance(exc, httpx.TimeoutException):
            return RequestTimeout(f"no answer from {self.base_url} within {self.timeout} s ({exc.__class__.__name__})")
        if isinstance(exc, httpx.ConnectError):
            return _unreachable(self.base_url, exc)
        return DgError(f"talking to {self.base_url} failed: {exc!r}")

    @staticmethod
    def _answer(response: httpx.Response) -> Any:
        if response.is_success:
            return response.json()
        raise error_from_http(response.status_code, response.headers, response.content)


class Client(_ClientBase):
    """The sync client. `timeout` bounds a whole POST and every wait between two streamed events; `retries`
    retries a 429/503 after its Retry-After (POSTs, and stream requests the service refused)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = 0):
        super().__init__(base_url, api_key, timeout, retries)
        self._http = httpx.Client(base_url=self.base_url, headers=_auth_headers(api_key), timeout=self._timeout())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None) -> Any:
        attempt = 0
        while True:
            try:
                try:
                    response = self._http.request(method, path, json=body, headers=headers)
                except httpx.TransportError as exc:
                    raise self._map_transport(exc) from exc
                return self._answer(response)
            except DgError as exc:
                wait = _retry_wait(exc, attempt, self.retries)
                if wait is None:
                    raise
                attempt += 1
                time.sleep(wait)

    def ready(self) -> dict[str, Any]:
        """GET /readyz: `{ready, workers, models, ...}` (a not-ready service answers too, with its reason)."""
        try:
            response = self._http.get("/readyz")
        except httpx.TransportError as exc:
            raise self._map_transport(exc) from exc
        return response.json()

    def generate(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
                 idempotency_key: str | None = None, **params: Unpack[GenerateParams]) -> Completion:
        """POST /generate: one request, its final answer. Give `prompt` or `messages` (chat)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        data = self._request("POST", "/generate", generate_body(prompt, messages, **params), headers)
        return Completion.from_json(data)

    def stream(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
               **params: Unpack[GenerateParams]) -> Stream:
        """One request over WS /ws/generate: iterate for `Queued`, `Step` (every denoising step), `Canvas`,
        `Restarted`, and a final `Done` or `Error`. Connects on `with` or on the first event."""
        return Stream(self, generate_body(prompt, messages, **params))

    def sudoku(self, puzzle: str, seed: int | None = None, **options: Any) -> SudokuResult:
        """POST /sudoku: the puzzle (81 cells, `0` or `.` blank), solved, with the service's verdict. `options`
        go into the body as they are (e.g. `attempts`, `model`, `max_denoising_steps`)."""
        body: dict[str, Any] = {"puzzle": _puzzle(puzzle), "seed": seed, **options}
        body = {k: v for k, v in body.items() if v is not None}
        return SudokuResult.from_json(self._request("POST", "/sudoku", body))

    def stream_sudoku(self, puzzle: str, seed: int | None = None, model: str = "sudoku",
                      **params: Unpack[GenerateParams]) -> SudokuStream:
        """A Sudoku over the WebSocket (a generation with the puzzle as template): every step's grid, then
        `.sudoku_result` once done."""
        grid = _puzzle(puzzle)
        return SudokuStream(self, grid, sudoku_stream_body(grid, seed, model, **params))


class AsyncClient(_ClientBase):
    """The async client: the same calls as `Client`, awaited; streams are async iterators."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = 0):
        super().__init__(base_url, api_key, timeout, retries)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=_auth_headers(api_key),
                                       timeout=self._timeout())

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, body: Any = None,
                       headers: Mapping[str, str] | None = None) -> Any:
        attempt = 0
        while True:
            try:
                try:
                    response = await self._http.request(method, path, json=body, headers=headers)
                except httpx.TransportError as exc:
                    raise self._map_transport(exc) from exc
                return self._answer(response)
            except DgError as exc:
                wait = _retry_wait(exc, attempt, self.retries)
                if wait is None:
                    raise
                attempt += 1
                await asyncio.sleep(wait)

    async def ready(self) -> dict[str, Any]:
        """GET /readyz."""
        try:
            response = await self._http.get("/readyz")
        except httpx.TransportError as exc:
            raise self._map_transport(exc) from exc
        return response.json()

    async def generate(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
                       idempotency_key: str | None = None, **params: Unpack[GenerateParams]) -> Completion:
        """POST /generate: one request, its final answer."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        data = await self._request("POST", "/generate", generate_body(prompt, messages, **params), headers)
        return Completion.from_json(data)

    def stream(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
               **params: Unpack[GenerateParams]) -> AsyncStream:
        """One request over WS /ws/generate (`async with` / `async for`); connects on entry or first event."""
        return AsyncStream(self, generate_body(prompt, messages, **params))

    async def sudoku(self, puzzle: str, seed: int | None = None, **options: Any) -> SudokuResult:
        """POST /sudoku."""
        body: dict[str, Any] = {"puzzle": _puzzle(puzzle), "seed": seed, **options}
        body = {k: v for k, v in body.items() if v is not None}
        return SudokuResult.from_json(await self._request("POST", "/sudoku", body))

    def stream_sudoku(self, puzzle: str, seed: int | None = None, model: str = "sudoku",
                      **params: Unpack[GenerateParams]) -> AsyncSudokuStream:
        """A Sudoku over the WebSocket, every step's grid streamed."""
        grid = _puzzle(puzzle)
        return AsyncSudokuStream(self, grid, sudoku_stream_body(grid, seed, model, **params))


__all__ = [
    "AsyncClient", "AsyncStream", "AsyncSudokuStream", "AuthError", "Canvas", "Client", "Completion", "DgError",
    "Done", "Error", "Event", "GenerateParams", "Overloaded", "Queued", "RequestFailed", "RequestTimeout",
    "Restarted", "ServiceUnreachable", "Step", "Stream", "SudokuResult", "SudokuStream", "Unavailable", "Usage",
    "ValidationError", "error_from_event", "error_from_http", "generate_body", "is_valid_solution", "parse_event",
    "sudoku_stream_body",
]
