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
event typed with the models of `protocol.contract`; answers are the gateway's own models (`protocol.api`:
`Completion` is its `GenerateResponse`, `SudokuResult` its `SudokuResponse`). Errors raise a `DgError` subclass:
`ValidationError` (422, naming the field), `Overloaded` (429), `Unavailable` (503), `AuthError` (401),
`RequestFailed` (a request that ended with an error, with its `code`), `ServiceUnreachable` (nothing answers at
the URL), `RequestTimeout`. `retries=` retries 429 and 503 after their Retry-After (off by default).

    aio.py      AsyncClient: every call, on the caller's loop
    sync.py     Client, Stream: the async client run on a loop of its own (no loop of the caller's needed)
    stream.py   the async stream: one request over its own WebSocket
    state.py    the stream's state machine (what it has seen; no I/O)
    bodies.py   request bodies (checked against the gateway's models for unknown names), URLs
    errors.py   the exceptions, from HTTP answers and `error` events
"""

from dgserve.client.aio import AsyncClient
from dgserve.client.bodies import GENERATE_PARAMS, generate_body, sudoku_stream_body
from dgserve.client.errors import (
    AuthError,
    DgError,
    Overloaded,
    RequestFailed,
    RequestTimeout,
    ServiceUnreachable,
    Unavailable,
    ValidationError,
    error_from_event,
    error_from_http,
)
from dgserve.client.state import Event, StreamState, parse_event
from dgserve.client.stream import AsyncStream, AsyncSudokuStream
from dgserve.client.sync import Client, Stream, SudokuStream
from protocol.api import GenerateResponse as Completion
from protocol.api import SudokuResponse as SudokuResult
from protocol.contract import Canvas, Done, Error, Queued, Restarted, Step, Usage
from protocol.sudoku import is_valid_solution

__all__ = [
    "GENERATE_PARAMS", "AsyncClient", "AsyncStream", "AsyncSudokuStream", "AuthError", "Canvas", "Client",
    "Completion", "DgError", "Done", "Error", "Event", "Overloaded", "Queued", "RequestFailed", "RequestTimeout",
    "Restarted", "ServiceUnreachable", "Step", "Stream", "StreamState", "SudokuResult", "SudokuStream", "Unavailable",
    "Usage", "ValidationError", "error_from_event", "error_from_http", "generate_body", "is_valid_solution",
    "parse_event", "sudoku_stream_body",
]
