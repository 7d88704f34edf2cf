"""Helpers shared by the Triton kernels (`worker/ops/triton/*`, `worker/fused.py`): one definition of each.

    round_bf16      float32 -> nearest bfloat16 (ties to even) kept in float32, by bit arithmetic
    round_to        the same for any model dtype (MODE: see `dtype_mode`)
    dot             a float32-accumulating tl.dot that the CPU interpreter computes correctly for bf16
    gelu_tanh       GELU-tanh without cancellation
    grouped_tile    program -> (m block, n tile), grouped so that weight tiles are served from L2
    load_k          a GEMM operand tile, zero past the end of K, unmasked where K divides into whole blocks
    interpreting    whether kernels run under TRITON_INTERPRET=1 (the UPCAST flag of `dot`)
    round_e4m3, quantize_e4m3_rows, scaled_dot: the block-scaled fp8 GEMMs' pieces (worker/fp8.py)
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


@triton.jit
def load_k(ptrs, k_in, EVEN_K: tl.constexpr):
    """The tile at ptrs, zero where k_in (its K positions still inside K) is False. EVEN_K (K a multiple of
    BLOCK_K): no mask, so that loads along a contiguous K dim stay 16-byte vectors (k_in is then unused, and dropped
    by the compiler)."""
    if EVEN_K:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=k_in, other=0.0)
    return tile


# ------------------------------------------------------------------------------------- fp8 (worker/fp8.py)


@triton.jit
def round_e4m3(y):
    """float32 (|y| <= 448) -> the nearest float8 e4m3 value (ties to even, subnormals included), kept in float32.
    Bit arithmetic, as torch rounds on the CPU and a GPU's cvt.rn does: the interpreter's own conversion rounds
    ties away and flushes subnormals. Normal values keep 3 of float32's 23 mantissa bits; below e4m3's smallest
    normal (2^-6) the step is 2^-9, which adding and taking away 1.5 * 2^14 rounds to (in float32 the spacing there
    is 2^-9)."""
    bits = y.to(tl.int32, bitcast=True)
    normal = ((bits + (((bits >> 20) & 1) + 0x7FFFF)) & -1048576).to(tl.float32, bitcast=True)
    subnormal = (y + 24576.0) - 24576.0
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def quantize_e4m3_rows(x, UPCAST: tl.constexpr):
    """x (M, G), each row one (token, channel group) -> its e4m3 values (float8e4nv; under the interpreter float32
    on the e4m3 grid) and the group's scale (M,) float32: the smallest power of two s with amax / s <= 448 (as
    `worker.fp8.pow2_scale`: amax = 1.f x 2^(E-127) needs s = 2^(E-135), or 2^(E-134) where 1.f > 1.75).
    x / s is exact, so the only rounding is the conversion's. bf16 x stays bf16 (half the registers of float32):
    amax and the product with a power of two are exact in it."""
    if UPCAST or x.dtype == tl.float16:  # the interpreter's bf16 products misbehave; 2^72 does not fit float16
        x = x.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), 1).to(tl.float32), 5.421010862427522e-20)  # worker.fp8.AMAX_FLOOR, 2^-64
    bits = amax.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    scale = ((e + 127) << 23).to(tl.float32, bitcast=True)
    y = x * ((127 - e) << 23).to(tl.float32, bitcast=True).to(x.dtype)[:, None]
    if UPCAST:
        q = round_e4m3(y.to(tl.float32))
    else:
        q = y.to(tl.float8e4nv)
    return q, scale


@triton.jit
def scaled_dot(a, a_scale, w, w_scale, acc, UPCAST: tl.constexpr):
    """One K block of a block-scaled fp8 GEMM: acc + (a @ w) * a_scale[:, None] * w_scale[None, :]. The block's
    product starts from zero (fp8 tensor-core sums keep ~14 bits on Hopper: promoted to float32 every 128 channels,
    as DeepSeek-V3 does) and is scaled in float32 (powers of two: exact)."""
    part = dot(a, w, tl.zeros_like(acc), UPCAST)
    return acc + part * (a_scale[:, None] * w_scale[None, :])


@triton.jit
def gemm_step(x, w, acc, s_ptrs, kb, FP8: tl.constexpr, UPCAST: tl.constexpr):
    """One K step of a GEMM: acc + x @ w; FP8: x quantized per row, w float8 with its columns' scales of K block kb
    at s_ptrs + kb."""
    if FP8:
        xq, xs = quantize_e4m3_rows(x, UPCAST)
        acc = scaled_dot(xq, xs, w, tl.load(s_ptrs + kb), acc, UPCAST)
    else:
        acc = dot(x, w, acc, UPCAST)
    return acc


@triton.jit
def gate_up_step(x, wg, wu, gate, up, sg_ptrs, su_ptrs, kb, FP8: tl.constexpr, UPCAST: tl.constexpr):
    """One K step of a gate/up GEMM: both accumulators over the same x tile (FP8: quantized once)."""
    if FP8:
        xq, xs = quantize_e4m3_rows(x, UPCAST)
        gate = scaled_dot(xq, xs, wg, tl.load(sg_ptrs + kb), gate, UPCAST)
        up = scaled_dot(xq, xs, wu, tl.load(su_ptrs + kb), up, UPCAST)
    else:
        gate = dot(x, wg, gate, UPCAST)
        up = dot(x, wu, up, UPCAST)
    return gate, up
