"""What goes into and comes out of the engine: plain data, no tensors, no I/O.

Requests and the runner's messages go in (`Admit`, `Cancel`, `Finish`: applied between steps, in the order sent);
events come out, one list per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.contract import Sampling as SamplingParams  # one definition of a request's parameters


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    # canvas template: position -> token id, clamped at every step and never renoised
    template: dict[int, int] | None = None
    # the running deadline: past either, the request ends with a `deadline_exceeded` error
    max_steps: int | None = None  # denoising steps, over all its canvases
    max_running_s: float | None = None  # seconds since it joined the batch


@dataclass
class StepEvent:
    request_id: str
    canvas: int  # index of the canvas within the request, from 0
    step: int  # denoising step within the canvas, from 1
    draft_ids: list[int]  # argmax draft of the whole canvas
    accepted: int  # positions accepted (not renoised) at this step
    mean_entropy: float
    accepted_mask: list[bool] = field(default_factory=list)  # per position
    entropy: list[float] = field(default_factory=list)  # per position, of the temperature-scaled distribution
    type: str = field(default="step", init=False)


@dataclass
class CanvasEvent:
    request_id: str
    canvas: int
    token_ids: list[int]  # the committed canvas, cut at the first EOS / max_new_tokens
    steps: int
    seconds: float = 0.0  # since the previous commit (the first canvas: since the request joined the batch)
    type: str = field(default="canvas", init=False)


@dataclass
class DoneEvent:
    request_id: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS), "length" (max_new_tokens), or what `Engine.finish` gave ("stop_string")
    prompt_tokens: int
    canvases: int
    denoising_steps: int
    type: str = field(default="done", init=False)


@dataclass
class ErrorEvent:
    request_id: str
    code: str  # "cancelled", "engine_error", "too_long", "numerical_error", "deadline_exceeded"
    message: str
    type: str = field(default="error", init=False)


EngineEvent = StepEvent | CanvasEvent | DoneEvent | ErrorEvent


# ---------------------------------------------------------------- the runner's messages to the engine
@dataclass(frozen=True)
class Admit:
    request: EngineRequest


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class Finish:
    """End a running request as done: `finish_reason` `reason`, its first `keep_tokens` tokens."""

    request_id: str
    reason: str
    keep_tokens: int


EngineMessage = Admit | Cancel | Finish
