"""The sync client: the async client run on an event loop of its own (a daemon thread), so that it needs no loop
of the caller's and works inside programs that run one. Every call and every stream step is the async one's."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from dgserve.client.aio import DEFAULT_TIMEOUT, DEFAULT_URL, AsyncClient
from dgserve.client.state import Event
from dgserve.client.stream import AsyncStream, AsyncSudokuStream
from protocol.api import GenerateResponse, SudokuResponse
from protocol.contract import Canvas, Done, Step

T = TypeVar("T")


class _Loop:
    """An event loop running on a daemon thread; `run` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dgserve-client", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:  # a finaliser run by the loop itself: never wait on it
            self.loop.create_task(coroutine)
            return None  # type: ignore[return-value]
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:  # Ctrl-C in the caller stops the call on the loop too
            future.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            if threading.current_thread() is not self.thread:
                self.thread.join(timeout=10)


class Client:
    """The sync client: the calls of `AsyncClient`, each waited for. `timeout` bounds a whole POST and every wait
    between two streamed events; `retries` retries a 429/503 after its Retry-After (POSTs, and stream requests
    the service refused)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = 0):
        self._loop = _Loop()
        self._async = AsyncClient(base_url, api_key, timeout, retries)
        self._finalizer = weakref.finalize(self, self._loop.stop)

    @property
    def base_url(self) -> str:
        return self._async.base_url

    @property
    def api_key(self) -> str | None:
        return self._async.api_key

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._finalizer.alive:
            self._loop.run(self._async.close())
            self._finalizer()

    def ready(self) -> dict[str, Any]:
        """GET /readyz: `{ready, workers, models, ...}` (a not-ready service answers too, with its reason)."""
        return self._loop.run(self._async.ready())

    def generate(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
                 idempotency_key: str | None = None, **params: Any) -> GenerateResponse:
        """POST /generate: one request, its final answer. Give `prompt` or `messages` (chat)."""
        return self._loop.run(self._async.generate(prompt, messages=messages, idempotency_key=idempotency_key,
                                                   **params))

    def stream(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, str]] | None = None,
               **params: Any) -> Stream:
        """One request over WS /ws/generate: iterate for `Queued`, `Step` (every denoising step), `Canvas`,
        `Restarted`, and a final `Done` or `Error`. Connects on `with` or on the first event."""
        return Stream(self._loop, self._async.stream(prompt, messages=messages, **params))

    def sudoku(self, puzzle: str, seed: int | None = None, **options: Any) -> SudokuResponse:
        """POST /sudoku: the puzzle (81 cells, `0` or `.` blank), solved, with the service's verdict."""
        return self._loop.run(self._async.sudoku(puzzle, seed, **options))

    def stream_sudoku(self, puzzle: str, seed: int | None = None, model: str = "sudoku",
                      **params: Any) -> SudokuStream:
        """A Sudoku over the WebSocket: every step's grid (`.grid`), then `.sudoku_result` once done."""
        return SudokuStream(self._loop, self._async.stream_sudoku(puzzle, seed, model, **params))


class Stream:
    """One streamed request over its own WebSocket (sync): the async stream's events, each waited for. Its state
    (`request_id`, `result`, `error`, `text`, `draft`, ...) is the async stream's. Use it as a context manager to
    own the connection: leaving the block closes it, which cancels the request if it is still running."""

    def __init__(self, loop: _Loop, inner: AsyncStream):
        self._loop, self._inner = loop, inner

    def __getattr__(self, name: str) -> Any:  # the stream's state: the async stream's own
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __enter__(self) -> Stream:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if self._loop.loop.is_running():
                self.close()

    def open(self) -> Stream:
        """Connect and send the request; returns once it is queued (`request_id` set). Idempotent."""
        self._loop.run(self._inner.open())
        return self

    def close(self) -> None:
        """Close the connection (the service cancels the request if it is still running)."""
        self._loop.run(self._inner.close())

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        try:
            return self._loop.run(self._inner.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def steps(self) -> Iterator[Step]:
        """Only the `Step` events (every denoising step), to the end of the request."""
        return (e for e in self if isinstance(e, Step))

    def canvases(self) -> Iterator[Canvas]:
        """Only the committed `Canvas` events, to the end of the request."""
        return (e for e in self if isinstance(e, Canvas))

    def wait(self) -> Done:
        """Read to the end; the final `Done`, or `RequestFailed` if the request ended with an error."""
        return self._loop.run(self._inner.wait())

    def cancel(self, request_id: str | None = None) -> None:
        """Ask the service to cancel the request; its `Error` (code `cancelled`) follows in the stream."""
        self._loop.run(self._inner.cancel(request_id))


class SudokuStream(Stream):
    """A streamed Sudoku (sync): `grid` is the 81-cell grid as it converges, `sudoku_result` the verdict."""

    _inner: AsyncSudokuStream

    @property
    def grid(self) -> str:
        return self._inner.grid

    @property
    def sudoku_result(self) -> SudokuResponse | None:
        return self._inner.sudoku_result
