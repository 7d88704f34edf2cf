"""What the client sends: request bodies (checked against the gateway's own models for unknown names), URLs and
headers."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from dgserve.client.errors import ValidationError
from protocol.api import GenerateRequest
from protocol.sudoku import normalize_puzzle

# the optional fields of a generation: POST /generate's own (`protocol.api.GenerateRequest`)
GENERATE_PARAMS = tuple(name for name in GenerateRequest.model_fields if name not in ("prompt", "messages"))


def generate_body(prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None,
                  **params: Any) -> dict[str, Any]:
    """The JSON body of POST /generate (and of a WebSocket `generate` message, less `type`). `params` are
    GENERATE_PARAMS (None: the checkpoint's default); the service checks their values."""
    unknown = sorted(set(params) - set(GENERATE_PARAMS))
    if unknown:
        raise TypeError(f"unknown generation parameter(s) {', '.join(unknown)}; known: {', '.join(GENERATE_PARAMS)}")
    body: dict[str, Any] = {}
    if prompt is not None:
        body["prompt"] = prompt
    if messages is not None:
        body["messages"] = [dict(m) for m in messages]
    for key, value in params.items():
        if value is not None:
            body[key] = list(value) if key == "template" and not isinstance(value, str) else value
    return body


def sudoku_stream_body(puzzle: str, seed: int | None = None, model: str = "sudoku", **params: Any) -> dict[str, Any]:
    """A Sudoku as a generation: the puzzle (0 = blank) is the prompt and the canvas template, `0` its hole;
    the canvas is the 81 solution digits."""
    grid = checked_puzzle(puzzle)
    merged: dict[str, Any] = {"max_new_tokens": 81, **params, "model": model, "seed": seed,
                              "template": grid, "template_hole": "0"}
    return generate_body(grid, **merged)


def checked_puzzle(puzzle: str) -> str:
    """The puzzle normalized (81 cells, `0` blank), or a ValidationError naming `puzzle`."""
    try:
        return normalize_puzzle(puzzle)
    except ValueError as exc:
        raise ValidationError(str(exc), field="puzzle", status=None) from None


def base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


def ws_url(base: str) -> str:
    parts = urllib.parse.urlsplit(base)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {base!r}")
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws/generate", "", ""))


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
