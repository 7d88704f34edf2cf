"""The Triton twins of the ops, registered as their CUDA kernels.

Each module under `worker/ops/triton/` defines, for every op it implements, a function with the op's name and
signature. They run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (how the tests check them
against the plain-torch implementations).
"""

from __future__ import annotations

import importlib
import logging

import torch

from worker.ops.registry import OPS

log = logging.getLogger(__name__)

# module under worker/ops/triton -> the ops it implements
TRITON_OPS: dict[str, tuple[str, ...]] = {
    "norms": ("rms_norm", "post_attention", "ffn_combine", "embed_condition", "embed_norm"),
    "mlp": ("gate_up_gelu",),
    "rope": ("qk_norm_rope_store",),
    "attention": ("attention",),
    "moe": ("moe_route", "moe_align", "moe_gate_up", "moe_down"),
    "fp8": ("linear_fp8", "gate_up_gelu_fp8", "moe_gate_up_fp8", "moe_down_fp8"),
}


def have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_function(name: str):
    """The Triton implementation of op `name` (None where it has none yet)."""
    for module, names in TRITON_OPS.items():
        if name in names:
            try:
                mod = importlib.import_module(f"worker.ops.triton.{module}")
            except ModuleNotFoundError:
                return None
            return getattr(mod, name, None)
    return None


def register_cuda_kernels() -> list[str]:
    """Register every Triton implementation as its op's CUDA kernel; returns the names registered."""
    if not (torch.cuda.is_available() and have_triton()):
        return []
    done = []
    for name, op in OPS.items():
        fn = triton_function(name)
        if fn is None:
            log.warning("op %s has no Triton kernel; CUDA runs its plain-torch implementation", name)
            continue
        op.register_kernel("cuda", fn)
        done.append(name)
    return done
