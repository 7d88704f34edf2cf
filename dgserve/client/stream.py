"""One request streamed over its own WebSocket, async: it drives the state machine of `state.py`. The sync stream
(`sync.py`) runs this one on its client's loop."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import websockets
import websockets.asyncio.client as ws_async

from dgserve.client.bodies import auth_headers
from dgserve.client.errors import DgError, RequestTimeout, error_from_http, retry_wait, unreachable
from dgserve.client.state import Event, StreamState
from protocol.api import SudokuResponse
from protocol.contract import Canvas, Done, Step
from protocol.sudoku import draft_grid

if TYPE_CHECKING:
    from dgserve.client.aio import AsyncClient

CONNECT_TIMEOUT = 10.0


class AsyncStream(StreamState):
    """One streamed request over its own WebSocket. `async for event in stream`; use
    `async with client.stream(...) as s:` to own the connection (leaving the block closes it, which cancels the
    request if it is still running)."""

    def __init__(self, client: AsyncClient, body: dict[str, Any]):
        super().__init__(body)
        self._client = client
        self._ws: ws_async.ClientConnection | None = None
        self._opened = False
        self._buffer: deque[Event] = deque()

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
                await self._send(self.message)
                while (queued := self.on_queued_or_rejection(await self._recv())) is None:
                    pass
                break
            except DgError as exc:
                wait = retry_wait(exc, attempt, self._client.retries)
                if wait is None:
                    await self.close()
                    raise
                attempt += 1
                await asyncio.sleep(wait)
            except BaseException:
                await self.close()
                raise
        self._buffer.append(queued)
        if self.cancel_pending:
            await self.cancel()
        return self

    async def _connect(self) -> None:
        if self._ws is not None:
            return
        c = self._client
        try:
            self._ws = await ws_async.connect(c.ws_url, additional_headers=auth_headers(c.api_key), max_size=None,
                                              open_timeout=min(CONNECT_TIMEOUT, c.timeout))
        except websockets.exceptions.InvalidStatus as exc:
            r = exc.response
            raise error_from_http(r.status_code, dict(r.headers.raw_items()), r.body or b"") from None
        except TimeoutError as exc:
            raise RequestTimeout(f"no WebSocket handshake from {c.ws_url} within {CONNECT_TIMEOUT} s") from exc
        except (OSError, websockets.exceptions.InvalidHandshake) as exc:
            raise unreachable(c.base_url, exc) from exc

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
        if self.finished or self._ws is None:
            raise StopAsyncIteration
        while True:
            event = self.on_event(await self._recv())
            if event is not None:
                if self.finished:
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
        return self.final()

    async def cancel(self, request_id: str | None = None) -> None:
        """Ask the service to cancel the request; its `Error` (code `cancelled`) follows in the stream."""
        message = self.cancel_message(request_id)
        if message is not None and self._ws is not None:
            await self._send(message)


class AsyncSudokuStream(AsyncStream):
    """A streamed Sudoku: every step's `draft_text` is the 81-cell grid."""

    def __init__(self, client: AsyncClient, puzzle: str, body: dict[str, Any]):
        super().__init__(client, body)
        self.puzzle = puzzle

    @property
    def grid(self) -> str:
        """81 display cells: the givens, and the latest draft's digits elsewhere (`.` for a non-digit)."""
        if self.draft is None:
            return draft_grid(self.puzzle, "")
        return draft_grid(self.puzzle, self.draft.draft_text, self.draft.draft_ids)

    @property
    def sudoku_result(self) -> SudokuResponse | None:
        """The verdict (checked here, as the gateway checks it) once the request is done: POST /sudoku's answer
        for this one attempt."""
        return None if self.result is None else SudokuResponse.judge(self.puzzle, self.result)
