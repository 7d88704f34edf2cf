"""Triton kernel of `gate_up_gelu` (`worker/ops/mlp.py` is its specification).

One GEMM with two float32 accumulators over the same x tiles: each program owns a (BLOCK_M, BLOCK_N) tile of the
(N, I) output, streams x[rows, k-block] once and both W_gate and W_up [cols, k-block] through shared memory, and in
the epilogue rounds gate and up to the model dtype (as each F.linear returns), applies GELU-tanh, rounds, multiplies,
rounds, and writes the tile once. Programs are ordered in groups of GROUP_M row tiles so that a group's weight
columns stay in L2 while its rows stream. The GELU, the float32-accumulating dot and the tile order are shared with the
expert GEMMs (`worker/ops/triton/common.py`): one definition of each. With FP8 it is gate_up_gelu_fp8's kernel
(launched from fp8.py): float8 weights with 128 x 128 block scales, x quantized per 128-channel group as it loads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from worker.fp8 import BLOCK as SCALE_BLOCK
from worker.ops.triton.common import (
    dtype_mode,
    gate_up_step,
    gelu_tanh,
    grouped_tile,
    interpreting,
    load_k,
    round_to,
    rows,
)


class Blocks(NamedTuple):
    m: int
    n: int
    k: int
    warps: int
    stages: int


# Per shape class, for sm90 (132 SMs, 228 KB shared memory per SM), where tl.dot is wgmma at 4/8 warps:
# - up to 4 canvas rows (N <= 1024): 64 x 64 tiles, 4 warps. At N = 256, I = 2112: 4 x 33 = 132 tiles, one per SM.
# - more rows: 128 x 64 tiles, 8 warps (two warpgroups of 64 rows): the two 128 x 64 accumulators are 64 float32
#   registers a thread, the arithmetic intensity of one 128 x 128 tile; 4 stages of (128 + 2 x 64) x 64 bf16 are
#   128 KB of shared memory. BLOCK_N 64 divides I = 2112 (33 tiles) and BLOCK_K 64 divides H = 2816.
SMALL = Blocks(64, 64, 64, 4, 4)
LARGE = Blocks(128, 64, 64, 8, 4)
GROUP_M = 8


def blocks_for(n_rows: int, small: Blocks = SMALL, large: Blocks = LARGE) -> Blocks:
    """The shape class of n_rows tokens: small up to 4 canvas rows (N <= 1024), large beyond (fp8.py passes the
    fp8 GEMMs' blocks)."""
    return small if n_rows <= 1024 else large


@triton.jit
def _gate_up_gelu_kernel(x_ptr, wg_ptr, wu_ptr, out_ptr, sg_ptr, su_ptr, N, INTER, H, s_x, s_wg, s_wu, s_sg, s_su,
                         MODE: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """FP8: float8 weights with 128 x 128 block scales sg, su (row strides s_sg, s_su); x quantized per 128-channel
    group as each K block (BLOCK_K 128) loads (worker/fp8.py)."""
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(INTER, BLOCK_N), GROUP)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows and columns past the edge read a valid row (their results are not stored): unmasked, vectorised loads
    cols = offs_n % INTER
    x_ptrs = x_ptr + (offs_m % N).to(tl.int64)[:, None] * s_x + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    wg_ptrs = wg_ptr + cols.to(tl.int64)[None, :] * s_wg + offs_k[:, None]  # (BLOCK_K, BLOCK_N)
    wu_ptrs = wu_ptr + cols.to(tl.int64)[None, :] * s_wu + offs_k[:, None]
    sg_ptrs = sg_ptr + (cols // 128) * s_sg  # (BLOCK_N,) each column's block row of scales (FP8)
    su_ptrs = su_ptr + (cols // 128) * s_su
    gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_in = offs_k < H - k0
        x = load_k(x_ptrs, k_in[None, :], EVEN_K)
        wg = load_k(wg_ptrs, k_in[:, None], EVEN_K)
        wu = load_k(wu_ptrs, k_in[:, None], EVEN_K)
        gate, up = gate_up_step(x, wg, wu, gate, up, sg_ptrs, su_ptrs, k0 // BLOCK_K, FP8, UPCAST)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    act = round_to(gelu_tanh(round_to(gate, MODE)), MODE)
    y = round_to(act * round_to(up, MODE), MODE)
    dst = out_ptr + offs_m.to(tl.int64)[:, None] * INTER + offs_n[None, :]
    tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=(offs_m < N)[:, None] & (offs_n < INTER)[None, :])


def launch(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, blocks: Blocks,
           scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """gate_up_gelu with the given blocks (the tests run both shape classes on small inputs); with `scales` (of
    w_gate and w_up), the float8 weights' gate_up_gelu_fp8 (blocks.k must be the scale block, 128)."""
    if scales is None and not x.dtype == w_gate.dtype == w_up.dtype:
        raise ValueError(f"gate_up_gelu needs one dtype, not x {x.dtype}, w_gate {w_gate.dtype}, w_up {w_up.dtype}")
    x, w_gate, w_up = rows(x), rows(w_gate), rows(w_up)
    (N, H), inter = x.shape, w_gate.shape[0]
    out = torch.empty((N, inter), dtype=x.dtype, device=x.device)
    if N == 0 or inter == 0:
        return out
    if scales is not None:
        assert blocks.k == SCALE_BLOCK, (
            f"fp8 weights are scaled per {SCALE_BLOCK} channels: BLOCK_K must be {SCALE_BLOCK}, not {blocks.k}")
    sg, su = (s.contiguous() for s in scales) if scales is not None else (x, x)  # unread without FP8
    grid = (triton.cdiv(N, blocks.m) * triton.cdiv(inter, blocks.n),)
    _gate_up_gelu_kernel[grid](x, w_gate, w_up, out, sg, su, N, inter, H, x.stride(0), w_gate.stride(0),
                               w_up.stride(0), sg.stride(0), su.stride(0), MODE=dtype_mode(x.dtype),
                               FP8=scales is not None, UPCAST=interpreting(), EVEN_K=H % blocks.k == 0,
                               BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, GROUP=GROUP_M,
                               num_warps=blocks.warps, num_stages=blocks.stages)
    return out


def gate_up_gelu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """x (N, H), w_gate and w_up (I, H) -> gelu_tanh(x @ w_gate^T) * (x @ w_up^T), (N, I) in x's dtype."""
    return launch(x, w_gate, w_up, blocks_for(x.shape[0]))
