"""What the runner reports as it works, one named hook per fact (the worker's metrics listen; tests may too).

Each hook runs on the thread its docstring names and must return quickly: the engine's thread waits for `stepped`,
the publisher's for `committed` and `published`. The defaults do nothing.
"""

from __future__ import annotations

from pydantic import BaseModel

from protocol import contract
from worker.types import CanvasEvent


class RunnerHooks:
    def admitted(self, job: contract.Job) -> None:
        """Fetcher thread: a job this worker took is about to reach the engine."""

    def stepped(self, seconds: float, rows: int, running: int, pending: int) -> None:
        """Engine thread: a batched step of `rows` rows took `seconds`; `running` rows remain, `pending` wait."""

    def committed(self, canvas: CanvasEvent) -> None:
        """Publisher thread: the engine committed a canvas (`canvas.seconds` after the previous one)."""

    def published(self, event: BaseModel, job: contract.Job) -> None:
        """Publisher thread (the fetcher's, for a job that ends at its take): Redis took an event of `job`."""
