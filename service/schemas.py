"""Request bodies of our own API. Hard limits live on the fields; deployment limits (prompt tokens,
max_new_tokens) are settings, checked in `service.jobs` with the same 422 shape."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.contract import Usage


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1, max_length=1_000_000)


class DiffusionFields(BaseModel):
    """The reference sampler's parameters; None means the checkpoint's generation config.

    Every request body is strict: a string is never taken for a number or a boolean (`"stream": "yes"`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_denoising_steps: int | None = Field(None, ge=1, le=1000)
    entropy_bound: float | None = Field(None, gt=0, le=10_000)
    t_min: float | None = Field(None, ge=0, le=100)
    # the schedule's lowest temperature is about t_max / max_denoising_steps: below 0.01 the scaled logits
    # overflow and every entropy is NaN
    t_max: float | None = Field(None, ge=0.01, le=100)
    stability_threshold: int | None = Field(None, ge=0, le=1000)
    confidence_threshold: float | None = Field(None, gt=0, le=100)

    @model_validator(mode="after")
    def _temperatures(self):
        if self.t_min is not None and self.t_max is not None and self.t_max <= self.t_min:
            raise ValueError(f"t_max ({self.t_max}) must be greater than t_min ({self.t_min})")
        return self


class SamplingFields(DiffusionFields):
    model: str | None = Field(None, min_length=1, max_length=128, description="served model name")
    max_new_tokens: int | None = Field(None, ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class GenerateRequest(SamplingFields):
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
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


class WsGenerate(GenerateRequest):
    type: Literal["generate"]
    ref: str | None = Field(None, max_length=128, description="echoed in the `queued` event")


class WsCancel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["cancel"]
    request_id: str | None = Field(None, max_length=128, description="omit to cancel every request")


class GenerateResponse(BaseModel):
    request_id: str
    model: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
