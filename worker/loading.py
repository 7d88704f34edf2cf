"""Loading a checkpoint: the same path for the tiny embedded models and google/diffusiongemma-26B-A4B-it."""

from __future__ import annotations

import logging
import time

import torch
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def load_model(path: str, device: str = "auto", dtype: str = "auto", quantization: str = "none"):
    """Load model and tokenizer once. Shows transformers' own progress bar while weights load."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    started = time.monotonic()
    kwargs: dict = {"dtype": dt}
    if dev.type == "cuda":
        kwargs["device_map"] = str(dev)
    if quantization != "none":
        kwargs["quantization_config"] = quantization_config(quantization)
    log.info("loading %s on %s as %s", path, dev, dt)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, **kwargs).eval()
    if dev.type != "cuda":
        model.to(dev)
    tokenizer = AutoTokenizer.from_pretrained(path)
    log.info("loaded %s in %.1fs", path, time.monotonic() - started)
    return model, tokenizer


def quantization_config(kind: str):
    """Weight-only quantization through a maintained library (torchao), for 24 GB cards."""
    from transformers import TorchAoConfig

    if kind == "fp8":
        from torchao.quantization import Float8WeightOnlyConfig

        return TorchAoConfig(quant_type=Float8WeightOnlyConfig())
    if kind == "int4":
        from torchao.quantization import Int4WeightOnlyConfig

        return TorchAoConfig(quant_type=Int4WeightOnlyConfig(group_size=128))
    raise ValueError(f"unknown quantization {kind!r} (none, fp8, int4)")
