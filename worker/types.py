"""What goes into and comes out of the engine: plain data, no tensors, no I/O."""

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
    type: str = field(default="canvas", init=False)


@dataclass
class DoneEvent:
    request_id: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS), "length" (max_new_tokens)
    prompt_tokens: int
    canvases: int
    denoising_steps: int
    type: str = field(default="done", init=False)


@dataclass
class ErrorEvent:
    request_id: str
    code: str  # "cancelled", "engine_error", "too_long"
    message: str
    type: str = field(default="error", init=False)


EngineEvent = StepEvent | CanvasEvent | DoneEvent | ErrorEvent
