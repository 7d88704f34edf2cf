"""Worker settings: read once at start-up from the environment (DG_*, REDIS_URL, HF_*).

A DG_* variable that no dgserve process reads is an error naming it (`protocol.environment`), not silence.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from protocol import environment

if TYPE_CHECKING:
    from worker.engine import EngineConfig


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DG_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", validation_alias=AliasChoices("REDIS_URL", "DG_REDIS_URL")
    )
    model_name: str = "text"
    model_path: str = "models/text"  # a local directory or a Hugging Face model id
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | bfloat16 | float16 | float32
    # worker/quantize.py: int4 for 24 GB cards (CUDA) and int8 (CPU or CUDA), weight-only through torchao; fp8 ours
    # (worker/fp8.py: block-scaled e4m3 through the fused GEMMs on sm90, the reference ops elsewhere)
    quantization: Literal["none", "int4", "int8", "fp8"] = "none"
    # the sampler's kernels (worker.engine.EngineConfig.sampler): exact (the reference's tokens for a seed), fast,
    # fused (Triton, CUDA), auto (fused on CUDA with Triton, fast elsewhere)
    sampler: Literal["auto", "exact", "fast", "fused"] = "auto"
    max_batch: int = Field(8, ge=1, le=1024)
    max_context: int = Field(2048, ge=16)
    sample_chunk_rows: int = Field(4, ge=1)
    torch_threads: int = Field(0, ge=0)  # 0: torch's default

    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(9100, ge=0, le=65535)  # 0: no metrics/health server
    worker_id: str = Field(default_factory=_default_worker_id)
    drain_timeout_s: float = Field(60.0, ge=0)
    heartbeat_interval_s: float = Field(5.0, gt=0)
    lease_ms: int = Field(30_000, ge=1000)  # a request held longer than this by a silent worker is reclaimed
    max_attempts: int = Field(3, ge=1)

    log_json: bool = False
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _every_dg_variable_is_read(self) -> WorkerSettings:
        environment.check(os.environ)
        return self

    def engine_config(self) -> EngineConfig:
        from worker.engine import EngineConfig

        return EngineConfig(max_batch=self.max_batch, max_context=self.max_context,
                            sample_chunk_rows=self.sample_chunk_rows, sampler=self.sampler)
