"""Triton kernels of the fp8 GEMMs (specs: worker/ops/fp8.py; the format: worker/fp8.py).

Float8 e4m3 weights with float32 128 x 128 block scales; activations stay in the model dtype in memory and are
quantized per (token, 128-channel group) in registers as each A tile loads (no extra kernel, no extra bytes). Every
GEMM walks K 128 deep, one scale block a step: acc += dot(a_fp8, w_fp8) * a_scale[:, None] * w_scale[None, :]
(`common.scaled_dot`; each column reads its own block row of scales, so tiles need not align with the blocks).

    linear_fp8        `_linear_fp8_kernel` below: grid (M tiles x N tiles), grouped order, one accumulator
    gate_up_gelu_fp8  the dense gate/up kernel of mlp.py with FP8
    moe_gate_up_fp8   the expert gate/up kernel of moe.py with FP8
    moe_down_fp8      the expert down kernel of moe.py with FP8

On sm90 tl.dot of two float8e4nv tiles is an fp8 wgmma (twice the bf16 rate); under the interpreter (tests) the
operands go in as float32 on the e4m3 grid (`common.round_e4m3`), the same numbers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.fp8 import BLOCK as SCALE_BLOCK  # K advances one scale block a step
from worker.ops.triton import mlp, moe
from worker.ops.triton.common import dtype_mode, gemm_step, grouped_tile, interpreting, load_k, round_to, rows

# Tiles per shape class for sm90 (fixed: no autotuning at start-up), K 128 deep. The A tile stays in the model
# dtype in shared memory (it is quantized in registers, kept bf16 there: half the registers of float32), B is float8.
# Compiled for sm90 (tests/test_fp8.py): fp8 wgmma (m64nNk32 e4m3), pipelined loads, no spills.
# - linear, up to 4 canvas rows (N <= 1024): 64 x 64 tiles, 4 warps, 4 stages (88 KB of shared memory, 192
#   registers): at one row q_proj (4096 outputs) is 4 x 64 = 256 tiles, two per SM, bound by the weights' bytes.
# - linear, more rows: 128 x 64, 8 warps (two warp groups of 64 rows), 4 stages (144 KB, 190 registers).
# - the dense gate/up GEMM has two accumulators and their two per-block products: at 4 warps it spilled (24 to 80
#   bytes a thread), so 8 warps on 64 x 64 tiles (182 registers), 3 stages (88 KB) up to 4 rows, 4 beyond (120 KB).
#   64 x 128 (each quantized x tile serving 2 x 128 weight columns) took 254 registers with triton 3.9 and
#   spilled 24 bytes with 3.6, the GPU image's.
LINEAR_SMALL = mlp.Blocks(64, 64, SCALE_BLOCK, 4, 4)
LINEAR_LARGE = mlp.Blocks(128, 64, SCALE_BLOCK, 8, 4)
GATE_UP_SMALL = mlp.Blocks(64, 64, SCALE_BLOCK, 8, 3)
GATE_UP_LARGE = mlp.Blocks(64, 64, SCALE_BLOCK, 8, 4)


def _check(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, name: str) -> None:
    if weight.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32:
        raise ValueError(f"{name} takes float8_e4m3fn weights with float32 scales, not {weight.dtype} and "
                         f"{scale.dtype}")
    dtype_mode(x.dtype)  # a supported activation dtype


@triton.jit
def _linear_fp8_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, NOUT, K, s_x, s_w, s_s,
                       MODE: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    tile_m, tile_n = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(NOUT, BLOCK_N), GROUP)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    cols = offs_n % NOUT  # rows and columns past the edge read valid ones (not stored): unmasked loads
    x_ptrs = x_ptr + (offs_m % N).to(tl.int64)[:, None] * s_x + offs_k[None, :]  # (BLOCK_M, BLOCK_K) model dtype
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * s_w + offs_k[:, None]  # (BLOCK_K, BLOCK_N) float8: W^T
    s_ptrs = s_ptr + (cols // 128) * s_s  # (BLOCK_N,) each column's row of block scales
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_in = offs_k < K - k0
        x = load_k(x_ptrs, k_in[None, :], EVEN_K)
        w = load_k(w_ptrs, k_in[:, None], EVEN_K)
        acc = gemm_step(x, w, acc, s_ptrs, k0 // BLOCK_K, True, UPCAST)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dst = out_ptr + offs_m.to(tl.int64)[:, None] * NOUT + offs_n[None, :]
    tl.store(dst, round_to(acc, MODE).to(out_ptr.dtype.element_ty),
             mask=(offs_m < N)[:, None] & (offs_n < NOUT)[None, :])


def linear_launch(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, blocks: mlp.Blocks
                  ) -> torch.Tensor:
    """linear_fp8 with the given blocks (the tests run both shape classes on small inputs)."""
    _check(x, weight, weight_scale, "linear_fp8")
    assert blocks.k == SCALE_BLOCK, blocks
    x, weight, weight_scale = rows(x), rows(weight), weight_scale.contiguous()
    (N, K), n_out = x.shape, weight.shape[0]
    out = torch.empty((N, n_out), dtype=x.dtype, device=x.device)
    if N == 0 or n_out == 0:
        return out
    grid = (triton.cdiv(N, blocks.m) * triton.cdiv(n_out, blocks.n),)
    _linear_fp8_kernel[grid](x, weight, weight_scale, out, N, n_out, K, x.stride(0), weight.stride(0),
                             weight_scale.stride(0), MODE=dtype_mode(x.dtype), UPCAST=interpreting(),
                             EVEN_K=K % blocks.k == 0, BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k,
                             GROUP=mlp.GROUP_M, num_warps=blocks.warps, num_stages=blocks.stages)
    return out


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x (N, K); weight (Nout, K) float8_e4m3fn, weight_scale (ceil(Nout/128), ceil(K/128)) -> (N, Nout)."""
    return linear_launch(x, weight, weight_scale, mlp.blocks_for(x.shape[0], LINEAR_SMALL, LINEAR_LARGE))


def gate_up_gelu_fp8(x: torch.Tensor, w_gate: torch.Tensor, w_gate_scale: torch.Tensor, w_up: torch.Tensor,
                     w_up_scale: torch.Tensor) -> torch.Tensor:
    """x (N, H); w_gate, w_up (I, H) float8 with their block scales -> gelu_tanh(x w_gate^T) * (x w_up^T) (N, I)."""
    _check(x, w_gate, w_gate_scale, "gate_up_gelu_fp8")
    _check(x, w_up, w_up_scale, "gate_up_gelu_fp8")
    blocks = mlp.blocks_for(x.shape[0], GATE_UP_SMALL, GATE_UP_LARGE)
    return mlp.launch(x, w_gate, w_up, blocks, (w_gate_scale, w_up_scale))


def moe_gate_up_fp8(x: torch.Tensor, w_gate_up: torch.Tensor, w_gate_up_scale: torch.Tensor,
                    sorted_ids: torch.Tensor, block_expert: torch.Tensor, num_padded: torch.Tensor, top_k: int
                    ) -> torch.Tensor:
    """x (N, H); w_gate_up (E, 2I, H) float8, w_gate_up_scale (E, ceil(2I/128), ceil(H/128)) -> act (P, I)."""
    moe.check_dtypes(x, w_gate_up, fp8=True)
    config = moe.gate_up_config(moe.layout_block(sorted_ids, block_expert), w_gate_up.shape[1] // 2, x.shape[1],
                                x.dtype, fp8=True)
    return moe.gate_up_launch(x, w_gate_up, w_gate_up_scale.contiguous(), sorted_ids, block_expert, top_k, config)


def moe_down_fp8(act: torch.Tensor, w_down: torch.Tensor, w_down_scale: torch.Tensor, sorted_ids: torch.Tensor,
                 block_expert: torch.Tensor, num_padded: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """act (P, I); w_down (E, H, I) float8, w_down_scale (E, ceil(H/128), ceil(I/128)) -> (N, k, H)."""
    moe.check_dtypes(act, w_down, fp8=True)
    config = moe.down_config(moe.layout_block(sorted_ids, block_expert), w_down.shape[1], w_down.shape[2],
                             act.dtype, fp8=True)
    return moe.down_launch(act, w_down, w_down_scale.contiguous(), sorted_ids, block_expert, num_tokens, top_k,
                           config)
