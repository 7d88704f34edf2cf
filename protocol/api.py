"""The gateway's public API as models: request bodies, answers and WebSocket messages, defined once for the gateway
(which validates and answers with them) and the client (which sends and reads them).

Hard limits live on the fields; deployment limits (prompt tokens, max_new_tokens) and the rules that need a
checkpoint's defaults (the temperature schedule) are checked by the gateway with the same 422 shape. Every
request body is strict: a string is never taken for a number or a boolean (`"stream": "yes"`).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.contract import Done, Usage
from protocol.sudoku import canvas_cells, is_valid_solution, normalize_puzzle, problems


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Answer(BaseModel):
    """What the gateway answers; a client reads it ignoring fields it does not know (a newer gateway's)."""

    model_config = ConfigDict(frozen=True)


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1, max_length=1_000_000)


class DiffusionFields(_Body):
    """The reference sampler's parameters; None means the checkpoint's generation config."""

    max_denoising_steps: int | None = Field(None, ge=1, le=1000)
    entropy_bound: float | None = Field(None, gt=0, le=10_000)
    t_min: float | None = Field(None, ge=0, le=100)
    # the schedule's lowest temperature is about t_max / max_denoising_steps: below 0.01 the scaled logits
    # overflow and every entropy is NaN. t_max > t_min is checked once both are known (contract.temperature_problem)
    t_max: float | None = Field(None, ge=0.01, le=100)
    stability_threshold: int | None = Field(None, ge=0, le=1000)
    confidence_threshold: float | None = Field(None, gt=0, le=100)


class SamplingFields(DiffusionFields):
    model: str | None = Field(None, min_length=1, max_length=128, description="served model name")
    max_new_tokens: int | None = Field(None, ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class GenerateRequest(SamplingFields):
    """POST /generate, and a WebSocket `generate` message."""

    prompt: str | None = Field(None, min_length=1, max_length=1_000_000)
    messages: list[Message] | None = Field(None, min_length=1, max_length=1000)
    template: list[int | None] | str | None = Field(
        None, max_length=65_536,
        description="canvas template: token ids (null for a hole) per canvas position, or text in which "
                    "`template_hole` marks the holes; fixed positions are clamped at every step",
    )
    template_hole: str = Field("_", min_length=1, max_length=1,
                               description="the character that marks a hole in a text template (one character: "
                                           "each character of the template is one canvas position)")

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


class GenerateResponse(_Answer):
    """The answer of POST /generate."""

    request_id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length", "stop_string"]
    usage: Usage

    @classmethod
    def of(cls, final: Done, model: str) -> GenerateResponse:
        """The answer for a request's final `Done` event."""
        return cls(request_id=final.request_id, model=model, text=final.text, token_ids=final.token_ids,
                   finish_reason=final.finish_reason, usage=final.usage)


class SudokuRequest(DiffusionFields):
    """POST /sudoku, and a WebSocket `sudoku` message."""

    puzzle: str = Field(description="81 cells row by row, digits 1-9, `0` or `.` for blanks", max_length=400)
    model: str = Field("sudoku", min_length=1, max_length=128)
    attempts: int = Field(8, ge=1, le=32, description="samples run side by side; the first valid one wins")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @field_validator("puzzle")
    @classmethod
    def _puzzle(cls, value: str) -> str:
        puzzle = normalize_puzzle(value)  # ValueError -> 422 naming `puzzle`
        conflicts = [p for p in problems(puzzle, puzzle.replace("0", "."), limit=9) if "repeats" in p]
        if conflicts:
            raise ValueError(f"the givens conflict: {'; '.join(conflicts)}")
        return puzzle


class SudokuResponse(_Answer):
    """A solved (or not) Sudoku: `solution` is 81 cells (a digit, or `.`), `valid` the verdict of
    `protocol.sudoku.is_valid_solution`, `problems` why not (in words); `attempt` is the attempt shown (of
    `attempts` run side by side), `steps` its denoising steps and `total_steps` those of every attempt."""

    request_id: str
    puzzle: str
    solution: str
    valid: bool
    problems: list[str]
    attempts: int
    attempt: int
    steps: int
    total_steps: int

    @classmethod
    def judge(cls, puzzle: str, final: Done, attempts: int = 1, attempt: int = 0) -> SudokuResponse:
        """The answer for one attempt's final event: its canvas read as a grid and checked against the rules.
        `total_steps` is this attempt's own steps (the gateway counts in those of the other attempts)."""
        solution = canvas_cells(puzzle, final.text, final.token_ids)
        valid = is_valid_solution(puzzle, solution)
        steps = final.usage.denoising_steps
        return cls(request_id=final.request_id, puzzle=puzzle, solution=solution, valid=valid,
                   problems=[] if valid else problems(puzzle, solution, limit=20), attempts=attempts,
                   attempt=attempt, steps=steps, total_steps=steps)


# ------------------------------------------------------------------ WebSocket messages, client -> gateway
class WsGenerate(GenerateRequest):
    type: Literal["generate"]
    ref: str | None = Field(None, max_length=128, description="echoed in the `queued` event")


class WsSudoku(SudokuRequest):
    type: Literal["sudoku"]
    ref: str | None = Field(None, max_length=128)


class WsCancel(_Body):
    type: Literal["cancel"]
    request_id: str | None = Field(None, max_length=128, description="omit to cancel every request")


class WsResume(_Body):
    type: Literal["resume"]
    request_id: str = Field(min_length=1, max_length=128)
    offset: int = Field(0, ge=0, le=10_000_000, description="events of the request the client already has")


# ------------------------------------------------------------------ WebSocket messages, gateway -> client
class FieldError(BaseModel):
    """One thing wrong with a message: `field` is its dotted path (`messages.0.content`), None for the message
    as a whole; `message` says what is wrong and the limit."""

    field: str | None
    message: str


class MessageError(BaseModel):
    """The gateway's answer to a WebSocket message it could not act on (`request_id` is null: no request
    exists). `errors` lists what was wrong, field by field; `message` is the same for a person to read."""

    type: Literal["error"] = "error"
    request_id: str | None = None
    code: str
    message: str
    errors: list[FieldError] = []
    ref: str | None = None  # the message's own `ref`, when it had one
    retry_after: int | None = None  # overloaded / unavailable: seconds to wait

    @classmethod
    def of(cls, code: str, errors: list[FieldError], ref: str | None = None,
           retry_after: int | None = None) -> MessageError:
        """The error for `errors`, its `message` made of them."""
        text = "; ".join(f"{e.field}: {e.message}" if e.field else e.message for e in errors)
        return cls(code=code, message=text, errors=errors, ref=ref, retry_after=retry_after)

    def encode(self) -> str:
        """As JSON: `request_id` always there (null for a message that started none), `ref` and `retry_after`
        only when set."""
        data = self.model_dump(mode="json")
        return json.dumps({k: v for k, v in data.items() if v is not None or k == "request_id"})
