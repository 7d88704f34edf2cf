"""OpenAI-compatible request bodies, and the parameters we refuse (by name, never silently)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from protocol.api import DiffusionFields

# OpenAI parameters that have no meaning for block diffusion here, with what to use instead
UNSUPPORTED: dict[str, str] = {
    "temperature": "diffusion uses a temperature schedule: set t_min and t_max",
    "top_p": "not supported by the entropy-bound sampler",
    "top_k": "not supported by the entropy-bound sampler",
    "presence_penalty": "penalties are not supported",
    "frequency_penalty": "penalties are not supported",
    "repetition_penalty": "penalties are not supported",
    "logit_bias": "logit_bias is not supported",
    "logprobs": "logprobs are not supported",
    "top_logprobs": "logprobs are not supported",
    "best_of": "best_of is not supported",
    "echo": "echo is not supported",
    "suffix": "suffix is not supported; use `template` for infilling",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "parallel_tool_calls": "tool calling is not supported",
    "response_format": "structured output is not supported; use `template`",
    "audio": "audio is not supported",
    "modalities": "only text is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning effort is not supported",
    "service_tier": "service tiers are not supported",
    "web_search_options": "web search is not supported",
    "store": "stored completions are not supported",
}


class _Base(DiffusionFields):
    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = Field(None, max_length=256)  # accepted, only for the caller's bookkeeping
    metadata: dict[str, str] | None = None  # likewise
    # the diffusion parameters come from DiffusionFields (extra body fields of the openai client)
    diffusing: bool = False  # stream every draft of the canvas (Mercury's field name)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s or len(s) > 256 for s in stops):
            raise ValueError("each stop sequence must have 1 to 256 characters")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value):
        if value is not None and set(value) - {"include_usage", "continuous_usage_stats"}:
            raise ValueError(f"unknown stream_options {sorted(set(value) - {'include_usage'})}")
        return value

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def diffusion_params(self) -> dict[str, Any]:
        keys = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
                "confidence_threshold", "seed")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class CompletionRequest(_Base):
    prompt: str | list[str] = Field(min_length=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("one prompt per request (use n for several completions)")
            value = value[0]
        if not value:
            raise ValueError("prompt must not be empty")
        return value


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Base):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
