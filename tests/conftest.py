from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under its interpreter. The mode is fixed when a kernel or helper is defined, so it
# is decided once for the session, before any module imports triton: a kernel defined in interpreter mode cannot call
# a helper defined before the mode was on (the Triton modules share helpers). An explicit TRITON_INTERPRET=0 on a GPU
# machine wins.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.procs import Service


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained 4-layer DiffusionGemma (canvas 32), built deterministically, loaded via from_pretrained."""
    from training.checkpoints import build_random_checkpoint

    return build_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0, canvas_length=32)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from worker.loading import load_model

    return load_model(str(tiny_checkpoint), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def service(tiny_checkpoint, tmp_path_factory):
    """Redis + gateway + one worker, real processes, shared by a test module."""
    with Service({"tiny": tiny_checkpoint}, tmp_path_factory.mktemp("logs")) as svc:
        svc.up("tiny")
        yield svc
