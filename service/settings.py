"""Gateway settings: read once at start-up from the environment (DG_*, REDIS_URL)."""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from protocol import environment
from protocol.contract import EVENTS_TTL_S


def _split(value: object) -> object:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DG_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", validation_alias=AliasChoices("REDIS_URL", "DG_REDIS_URL")
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # name=path_or_hf_id, comma separated; the gateway reads only tokenizer and config files
    models: Annotated[list[str], NoDecode] = ["text=models/text"]
    default_model: str | None = None

    max_prompt_tokens: int = Field(4096, ge=1)
    max_new_tokens: int = Field(4096, ge=1)
    max_denoising_steps: int = Field(1000, ge=1)  # an operator's cap on a request's steps per canvas
    max_queue_depth: int = Field(256, ge=1)  # requests waiting per model before 429
    # a request still queued after this ends with a timeout (its events are kept no longer than EVENTS_TTL_S)
    request_timeout_s: float = Field(600.0, gt=0, le=EVENTS_TTL_S)
    # the running deadline: a request past either ends with a `deadline_exceeded` error
    max_request_steps: int = Field(16_384, ge=1)  # denoising steps, over all of a request's canvases
    max_running_s: float = Field(600.0, gt=0)  # seconds since a worker took it
    max_body_bytes: int = Field(1_000_000, ge=1024)
    read_timeout_s: float = Field(20.0, gt=0)  # a request's headers and body must arrive within this
    max_ws_message_bytes: int = Field(1_000_000, ge=1024)
    max_connections_per_client: int = Field(64, ge=1)
    api_keys: Annotated[list[str], NoDecode] = []
    cors_origins: Annotated[list[str], NoDecode] = []
    retry_after_s: int = Field(2, ge=1)

    log_json: bool = False
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _every_dg_variable_is_read(self) -> GatewaySettings:  # a typo is an error naming it, not silence
        environment.check(os.environ)
        return self

    @field_validator("models", "api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        return _split(value)

    def model_paths(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in self.models:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"DG_MODELS entry {item!r} is not name=path")
            out[name.strip()] = path.strip()
        return out

    def default_model_name(self) -> str:
        return self.default_model or next(iter(self.model_paths()))
