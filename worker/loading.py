"""Loading a checkpoint: the same path for the tiny embedded models and google/diffusiongemma-26B-A4B-it."""

from __future__ import annotations

import logging
import time

import torch
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

from worker.device import resolve_device
from worker.quantize import after_load, from_pretrained_kwargs, weight_bytes

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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
    kwargs.update(from_pretrained_kwargs(quantization, dev))  # quantized experts: always eager
    log.info("loading %s on %s as %s%s", path, dev, dt, "" if quantization == "none" else f", {quantization} weights")
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path, **kwargs).eval()
    if dev.type != "cuda":
        model.to(dev)
    after_load(model, quantization)  # fp8: the loaded weights quantized in place
    tokenizer = AutoTokenizer.from_pretrained(path)
    log.info("loaded %s in %.1fs (weights %.2f GB)", path, time.monotonic() - started, weight_bytes(model) / 1e9)
    return model, tokenizer
