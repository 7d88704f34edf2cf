"""Helpers shared by the Triton kernels (`worker/ops/triton/*`, `worker/fused.py`): one definition of each.

    round_bf16      float32 -> nearest bfloat16 (ties to even) kept in float32, by bit arithmetic
    round_to        the same for any model dtype (MODE: see `dtype_mode`)
    dot             a float32-accumulating tl.dot that the CPU interpreter computes correctly for bf16
    gelu_tanh       GELU-tanh without cancellation
    grouped_tile    program -> (m block, n tile), grouped so that weight tiles are served from L2
    interpreting    whether kernels run under TRITON_INTERPRET=1 (the UPCAST flag of `dot`)
    dtype_mode, rows, pow2: launcher-side helpers

Why bit arithmetic: the interpreter's own bf16 conversion truncates, a GPU's rounds to nearest-even; rounding by
hand gives the same bits on both. Why `dot` upcasts under the interpreter: triton 3.9's interpreter multiplies bf16
operands' raw bits as integers; a product of two bf16 values is exact in float32, so float32 operands give the
GPU's numbers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# model dtype -> the MODE constexpr of `round_to`
MODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_mode(dtype: torch.dtype) -> int:
    if dtype not in MODES:
        raise ValueError(f"the Triton dgserve ops support {tuple(MODES)}, not {dtype}")
    return MODES[dtype]


def rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride in its last dim (the kernels take row strides and assume it)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """The next power of two >= n, clamped to [lo, hi]."""
    p = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return p if hi is None else min(p, hi)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on the CPU)."""
    return bool(triton.knobs.runtime.interpret)


@triton.jit
def round_bf16(y):
    """float32 -> nearest bfloat16 (ties to even), kept in float32. Bit arithmetic, so that it is the same on a GPU
    and under the CPU interpreter (whose own bf16 conversion truncates)."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_to(x, MODE: tl.constexpr):
    """float32 -> the nearest value of the model dtype (MODE 0 float32, 1 bfloat16, 2 float16), kept in float32."""
    if MODE == 1:
        x = round_bf16(x)
    elif MODE == 2:
        x = x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b, float32 accumulation ("ieee": float32 inputs are not truncated to tf32; bf16 ignores it).
    UPCAST (`interpreting()`): the operands go in as float32, exactly (see the module docstring)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def gelu_tanh(x):
    """0.5 x (1 + tanh(z)) as x * sigmoid(2z), z = sqrt(2/pi)(x + 0.044715 x^3): no cancellation at either end."""
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * z))


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program -> (m block, n tile), GROUP_M consecutive m blocks per n tile: blocks of one expert (or one weight
    column tile) sit next to each other, so a weight tile is fetched from HBM once and then served from L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size, (pid % per_group) // size
