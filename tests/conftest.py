from __future__ import annotations

from pathlib import Path

import pytest

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
