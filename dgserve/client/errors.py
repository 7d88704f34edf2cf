"""The client's exceptions, and the mapping from the service's answers (HTTP errors, `error` events) to them."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from email.utils import parsedate_to_datetime
from typing import Any

from protocol.api import MessageError

MAX_RETRY_WAIT = 60.0  # a Retry-After above this is capped


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


def retry_after(value: Any) -> float | None:
    """Seconds from a Retry-After value (seconds or an HTTP date)."""
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
    wait = retry_after({k.lower(): v for k, v in headers.items()}.get("retry-after"))
    if status in (401, 403):
        return AuthError(message, status=status, code=code, request_id=rid)
    if status == 422:
        if isinstance(detail, list):
            errors = [{"field": _field(e.get("loc") or ()), "message": str(e.get("msg", e))}
                      if isinstance(e, dict) else {"field": None, "message": str(e)} for e in detail]
            return _validation(errors, status, rid)
        return ValidationError(message, status=status, code=code or "validation_error", request_id=rid)
    if status == 429:
        return Overloaded(message, retry_after=wait, status=status, request_id=rid)
    if status == 503:
        return Unavailable(message, retry_after=wait, status=status, request_id=rid)
    if code:
        return RequestFailed(message, status=status, code=code, request_id=rid)
    return DgError(f"HTTP {status}: {message}", status=status, request_id=rid)


def error_from_event(data: Mapping[str, Any]) -> DgError:
    """The exception for an `error` event: a message the service refused (`protocol.api.MessageError`, its
    `errors` naming each field), or a request that failed."""
    code = str(data.get("code") or "error")
    event = MessageError.model_validate({**data, "code": code, "message": str(data.get("message") or code)})
    message, rid = event.message, event.request_id
    if code == "validation_error":
        errors = [e.model_dump() for e in event.errors] or [{"field": None, "message": message}]
        return ValidationError(message, field=errors[0]["field"], errors=errors, status=None, request_id=rid)
    if code == "overloaded":
        return Overloaded(message, retry_after=retry_after(event.retry_after), request_id=rid)
    if code == "unavailable":
        return Unavailable(message, retry_after=retry_after(event.retry_after), request_id=rid)
    if code in ("unauthorized", "auth_error"):
        return AuthError(message, code=code, request_id=rid)
    return RequestFailed(message, code=code, request_id=rid)


def retry_wait(exc: BaseException, attempt: int, retries: int) -> float | None:
    """Seconds to wait before retrying after `exc`, or None when it is not retried."""
    if attempt >= retries or not isinstance(exc, Overloaded | Unavailable):
        return None
    return min(exc.retry_after if exc.retry_after is not None else 1.0, MAX_RETRY_WAIT)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def unreachable(url: str, exc: BaseException) -> ServiceUnreachable:
    """Why nothing answers at `url`, read from `exc` and the errors under it (the async transports wrap the
    socket's own error in theirs)."""
    causes = list(_causes(exc))
    text = " ".join(str(c) for c in causes).lower()
    if any(isinstance(c, ConnectionRefusedError) for c in causes) or "refused" in text:
        reason = "connection refused"
    elif any(isinstance(c, socket.gaierror) for c in causes) or "name or service not known" in text \
            or "nodename" in text:
        reason = "unknown host"
    else:
        reason = str(exc) or exc.__class__.__name__
    return ServiceUnreachable(f"cannot reach the dgserve service at {url} ({reason})", url=url, reason=reason)
