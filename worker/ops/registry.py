"""Registering an op once, callable two ways: through the dispatcher (`torch.ops.dgserve.<name>`: one kernel, the
Triton one on CUDA) or as its plain-torch function (`PLAIN[name]`), for weights that are tensor subclasses
(torchao's quantized tensors implement aten ops, not ours)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LIB = "dgserve"
PLAIN: dict[str, Callable] = {}
OPS: dict[str, torch.library.CustomOpDef] = {}


def op(name: str, mutates_args: Sequence[str] = ()):
    def wrap(fn: Callable):
        PLAIN[name] = fn
        OPS[name] = torch.library.custom_op(f"{LIB}::{name}", fn, mutates_args=tuple(mutates_args))
        return OPS[name]
    return wrap
