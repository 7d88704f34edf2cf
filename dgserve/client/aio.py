"""The async client: every call the service answers, awaited on the caller's loop. The sync `Client` runs this
one on a loop of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from dgserve.client import bodies
from dgserve.client.bodies import auth_headers, checked_puzzle, generate_body, sudoku_stream_body
from dgserve.client.errors import DgError, RequestTimeout, error_from_http, retry_wait, unreachable
from dgserve.client.stream import CONNECT_TIMEOUT, AsyncStream, AsyncSudokuStream
from protocol.api import GenerateResponse, SudokuResponse

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 300.0  # seconds: a whole POST /generate, or the longest wait between two streamed events


class AsyncClient:
    """`timeout` bounds a whole POST and every wait between two streamed events; `retries` retries a 429/503
    after its Retry-After (POSTs, and stream requests the service refused)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = 0):
        self.base_url = bodies.base_url(base_url)
        self.ws_url = bodies.ws_url(self.base_url)
        self.api_key = api_key
        self.timeout = float(timeout)
        self.retries = int(retries)
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=auth_headers(api_key),
                                       timeout=httpx.Timeout(self.timeout, connect=min(CONNECT_TIMEOUT, self.timeout)))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _send(self, method: str, path: str, body: Any = None,
                    headers: Mapping[str, str] | None = None) -> httpx.Response:
        try:
            return await self._http.request(method, path, json=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise RequestTimeout(f"no answer from {self.base_url} within {self.timeout} s "
                                 f"({exc.__class__.__name__})") from exc
        except httpx.ConnectError as exc:
            raise unreachable(self.base_url, exc) from exc
        except httpx.TransportError as exc:
            raise DgError(f"talking to {self.base_url} failed: {exc!r}") from exc

    async def _request(self, method: str, path: str, body: Any = None,
                       headers: Mapping[str, str] | None = None) -> Any:
        """The answer's JSON; an error answer raises its DgError, 429 and 503 retried `retries` times."""
        attempt = 0
        while True:
            try:
                response = await self._send(method, path, body, headers)
                if response.is_success:
                    return response.json()
                raise error_from_http(response.status_code, response.headers, response.content)
            except DgError as exc:
                wait = retry_wait(exc, attempt, self.retries)
                if wait is None:
                    raise
                attempt += 1
                await asyncio.sleep(wait)

    async def ready(self) -> dict[str, Any]:
        """GET /readyz: `{ready, workers, models, ...}` (a not-ready service answers too, with its reason)."""
        return (await self._send("GET", "/readyz")).json()

    async def generate(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
                       idempotency_key: str | None = None, **params: Any) -> GenerateResponse:
        """POST /generate: one request, its final answer. Give `prompt` or `messages` (chat); `params` are the
        optional fields of POST /generate (`bodies.GENERATE_PARAMS`)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        data = await self._request("POST", "/generate", generate_body(prompt, messages, **params), headers)
        return GenerateResponse.model_validate(data)

    def stream(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
               **params: Any) -> AsyncStream:
        """One request over WS /ws/generate: iterate for `Queued`, `Step` (every denoising step), `Canvas`,
        `Restarted`, and a final `Done` or `Error`. Connects on `async with` or on the first event."""
        return AsyncStream(self, generate_body(prompt, messages, **params))

    async def sudoku(self, puzzle: str, seed: int | None = None, **options: Any) -> SudokuResponse:
        """POST /sudoku: the puzzle (81 cells, `0` or `.` blank), solved, with the service's verdict. `options`
        go into the body as they are (e.g. `attempts`, `model`, `max_denoising_steps`)."""
        body: dict[str, Any] = {"puzzle": checked_puzzle(puzzle), "seed": seed, **options}
        data = await self._request("POST", "/sudoku", {k: v for k, v in body.items() if v is not None})
        return SudokuResponse.model_validate(data)

    def stream_sudoku(self, puzzle: str, seed: int | None = None, model: str = "sudoku",
                      **params: Any) -> AsyncSudokuStream:
        """A Sudoku over the WebSocket (a generation with the puzzle as its template): every step's grid, then
        `.sudoku_result` once done."""
        grid = checked_puzzle(puzzle)
        return AsyncSudokuStream(self, grid, sudoku_stream_body(grid, seed, model, **params))

