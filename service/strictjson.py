"""Strict JSON at the edge: what a request body or a WebSocket message may contain.

Python's `json` takes NaN and Infinity, numbers that overflow to infinity, lone surrogates (`"\\ud800"`),
nesting until a RecursionError and integers of any size. None of those may reach a route, a log line or an
error message (which could not encode them): each is refused here, naming where it was found.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import HTTPException
from fastapi.routing import APIRoute
from starlette.requests import Request

MAX_DEPTH = 32  # our bodies nest 5 deep at most (messages -> content parts)
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # what a 64-bit signed integer holds (seeds use 63 bits)
MAX_INT_DIGITS = 20


class JsonProblem(HTTPException):
    """A body or message that is not strict JSON; `path` locates the offending value (keys and indexes)."""

    def __init__(self, message: str, path: tuple[str | int, ...] = ()):
        super().__init__(status_code=422, detail=message)
        self.message, self.path = message, path

    def describe(self) -> str:
        where = ".".join(str(p) for p in self.path)
        return f"{where}: {self.message}" if where else self.message


def loads(raw: bytes | str) -> Any:
    """Parse strict JSON, or raise JsonProblem."""
    try:
        value = json.loads(raw, parse_int=_bounded_int)
    except RecursionError:
        raise JsonProblem(f"nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise JsonProblem(f"not valid JSON: {exc.msg} at position {exc.pos}") from None
    except UnicodeDecodeError:
        raise JsonProblem("not valid JSON: the text is not UTF-8") from None
    check(value)
    return value


def check(value: Any) -> None:
    """Depth, numbers and strings of a parsed value (iteratively: a deep value must not recurse here)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise JsonProblem(f"nested deeper than {MAX_DEPTH} levels", path[:MAX_DEPTH])
        if isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, path)
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(item))
        elif isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, float) and not math.isfinite(item):
            raise JsonProblem("numbers must be finite (NaN and Infinity are not JSON)", path)
        elif isinstance(item, _HugeInt) or (isinstance(item, int) and not isinstance(item, bool)
                                            and not INT_MIN <= item <= INT_MAX):
            raise JsonProblem(f"integer out of range ({INT_MIN} to {INT_MAX})", path)


def _check_text(text: str, path: tuple[str | int, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonProblem("strings must be valid Unicode (a lone surrogate such as \\ud800 is not)",
                          path) from None


class _HugeInt:
    """An integer literal too long to convert (Python refuses past 4300 digits, slowly): `check` refuses it where
    it stands."""


def _bounded_int(digits: str) -> int | _HugeInt:
    return _HugeInt() if len(digits.lstrip("-")) > MAX_INT_DIGITS else int(digits)


def printable(value: object) -> str:
    """Text that always encodes: lone surrogates become their escapes."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


class UnsupportedMediaType(HTTPException):
    def __init__(self) -> None:
        super().__init__(status_code=415, detail="Content-Type must be application/json")


class StrictRequest(Request):
    """A request whose JSON body is parsed strictly, and only when it says it is JSON (a page elsewhere can
    send text/plain without asking first: no cross-site request may reach a route)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            kind = self.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
                raise UnsupportedMediaType()
            self._json = loads(await self.body())
        return self._json


class StrictRoute(APIRoute):
    """The route class of every router that takes a JSON body."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict_handler(request: Request):
            return await handler(StrictRequest(request.scope, request.receive))

        return strict_handler
