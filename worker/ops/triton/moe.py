"""Triton kernels of the mixture of experts (specs: worker/ops/moe.py): route, align, the gate/up GEMM, the down GEMM.

    moe_route    grid (N / BLOCK_T,): one tile of tokens x all E experts; logits, softmax, top-k, renormalise
    moe_align    two launches of G <= 128 programs over chunks of the N*k pairs: per-chunk expert histograms,
                 then each program rebuilds the group starts from them and scatters its chunk's pairs (stable),
                 and fills its share of the blocks (block_expert, sentinel rows)
    moe_gate_up  grid (P / BLOCK_M blocks x I / BLOCK_N tiles), grouped order: gather the block's tokens, both
                 halves of W_gate_up[e] in one pass over H, GELU-tanh(gate) * up in the epilogue
    moe_down     grid (P / BLOCK_M blocks x H / BLOCK_N tiles): act @ W_down[e]^T, each real row stored straight
                 to its pair's place out[pair // k, pair % k]

The grouped GEMMs also serve the fp8 experts (FP8; launched from fp8.py): float8 weights with 128 x 128 block
scales, the rows quantized per 128-channel group as they load.

Every launch sizes its grid and outputs from shapes only (no host sync: CUDA graphs capture them); counts and
expert ids are read inside the kernels. bf16 results repeat the spec's roundings (the GEMM outputs are rounded to
bf16 before GELU, GELU's result before the product, as the plain-torch ops do), with the bit-exact rounding of
worker/ops/triton/common.py, so that the interpreter and the GPU round alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.fp8 import BLOCK as SCALE_BLOCK
from worker.ops.moe import padded_size
from worker.ops.triton.common import (
    dot,
    gate_up_step,
    gelu_tanh,
    gemm_step,
    grouped_tile,
    interpreting,
    pow2,
    round_bf16,
)

# Rows per block of the aligned layout that the model runner passes as moe_align's `block` on CUDA: the M tile of
# both grouped GEMMs (wgmma's m64 per warp group). At one canvas row (2048 pairs over 128 experts, ~16 per expert)
# a larger block only multiplies the padding; at 64 rows (~1024 pairs per expert) 64 already fills the tensor cores.
BLOCK_M = 64

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def check_dtypes(x: torch.Tensor, weight: torch.Tensor, fp8: bool = False) -> None:
    """Activations and weights in one supported dtype (tl.dot takes two operands of the same type); fp8: float8
    e4m3 weights (the activations are quantized in the kernel)."""
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != (torch.float8_e4m3fn if fp8 else x.dtype):
        weights = "float8_e4m3fn weights" if fp8 else "weights in the same dtype"
        raise ValueError(f"the Triton MoE kernels take activations in one of {SUPPORTED_DTYPES} and {weights}, "
                         f"not {x.dtype} and {weight.dtype}")


# ---------------------------------------------------------------------------------------------------- moe_route


@triton.jit
def _route_kernel(x_ptr, w_ptr, scale_ptr, weights_ptr, ids_ptr, N, H, E,
                  TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
                  K_PAD: tl.constexpr, ROUND_BF16: tl.constexpr, UPCAST: tl.constexpr):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = toks < N
    experts = tl.arange(0, BLOCK_E)
    hs = tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + toks[:, None].to(tl.int64) * H + hs[None, :]  # (BLOCK_T, BLOCK_H)
    w_ptrs = w_ptr + experts[None, :] * H + hs[:, None]  # (BLOCK_H, BLOCK_E): W^T
    logits = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h_ok = hs + h0 < H
        x = tl.load(x_ptrs, mask=tok_ok[:, None] & h_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=h_ok[:, None] & (experts[None, :] < E), other=0.0)
        logits = dot(x, w, logits, UPCAST)
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    if ROUND_BF16:
        logits = round_bf16(logits)  # the spec's F.linear returns x's dtype
    logits = tl.where(experts[None, :] < E, logits, float("-inf"))  # the max ignores the padding columns
    # softmax numerators only: the renormalisation over the top k cancels the softmax's denominator
    p = tl.exp(logits - tl.max(logits, 1)[:, None])  # (BLOCK_T, BLOCK_E)
    p = tl.where(experts[None, :] < E, p, -1.0)  # padding columns below any probability, even one that underflowed
    slots = tl.arange(0, K_PAD)
    top_p = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    top_id = tl.zeros((BLOCK_T, K_PAD), tl.int32)
    for j in tl.static_range(TOP_K):  # k passes of max-and-mask; ties go to the lowest expert index
        best = tl.max(p, 1)
        best_id = tl.min(tl.where(p == best[:, None], experts[None, :], BLOCK_E), 1)
        top_p = tl.where(slots[None, :] == j, best[:, None], top_p)
        top_id = tl.where(slots[None, :] == j, best_id[:, None], top_id)
        p = tl.where(experts[None, :] == best_id[:, None], -1.0, p)
    slot_ok = slots[None, :] < TOP_K
    top_p = top_p / tl.sum(tl.where(slot_ok, top_p, 0.0), 1)[:, None]
    scale = tl.load(scale_ptr + top_id, mask=slot_ok, other=0.0).to(tl.float32)
    out = toks[:, None] * TOP_K + slots[None, :]
    ok = tok_ok[:, None] & slot_ok
    tl.store(weights_ptr + out, top_p * scale, mask=ok)
    tl.store(ids_ptr + out, top_id, mask=ok)


def moe_route(x: torch.Tensor, weight: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, H), weight (E, H), per_expert_scale (E,) -> weights (N, k) float32, ids (N, k) int32."""
    check_dtypes(x, weight)
    x, weight, per_expert_scale = x.contiguous(), weight.contiguous(), per_expert_scale.contiguous()
    N, H = x.shape
    E = weight.shape[0]
    weights = torch.empty((N, top_k), dtype=torch.float32, device=x.device)
    ids = torch.empty((N, top_k), dtype=torch.int32, device=x.device)
    config = route_config(N, E, top_k, x.dtype)
    if N:
        _route_kernel[(triton.cdiv(N, config["BLOCK_T"]),)](
            x, weight, per_expert_scale, weights, ids, N, H, E, **config)
    return weights, ids


def route_config(num_tokens: int, num_experts: int, top_k: int, dtype: torch.dtype) -> dict:
    """Tokens per program: 16 up to 16 canvas rows (N <= 4096: 16..256 programs, enough to spread the router
    weight's reads over the SMs), 64 beyond (256 programs at 64 rows, a quarter of the L2 traffic on the weight).
    The whole (BLOCK_T, E=128) logit tile stays in registers for the top-k; H is walked 64 deep, 4 stages."""
    return dict(TOP_K=top_k, BLOCK_T=16 if num_tokens <= 4096 else 64, BLOCK_H=64, BLOCK_E=pow2(num_experts, lo=16),
                K_PAD=pow2(top_k), ROUND_BF16=dtype == torch.bfloat16, UPCAST=interpreting(), num_warps=4, num_stages=4)


# ---------------------------------------------------------------------------------------------------- moe_align


@triton.jit
def _align_count_kernel(ids_ptr, counts_ptr, pairs, chunk, TILE: tl.constexpr, BLOCK_E: tl.constexpr):
    """counts[g, e] = pairs of chunk g (pairs g*chunk .. (g+1)*chunk - 1) routed to expert e."""
    g = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    count = tl.zeros((BLOCK_E,), tl.int32)
    for t in range(0, chunk, TILE):
        offs = g * chunk + t + tl.arange(0, TILE)
        e = tl.load(ids_ptr + offs, mask=offs < pairs, other=-1)
        count += tl.sum((e[:, None] == experts[None, :]).to(tl.int32), 0)
    tl.store(counts_ptr + g * BLOCK_E + experts, count)


@triton.jit
def _align_place_kernel(ids_ptr, counts_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
                        pairs, chunk, num_chunks, num_blocks, blocks_per_prog,
                        BLOCK: tl.constexpr, TILE: tl.constexpr, BLOCK_E: tl.constexpr, ROWS_G: tl.constexpr,
                        TILE_B: tl.constexpr):
    g = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    # every program rebuilds the group layout from the histograms: totals, and the pairs of earlier chunks
    count = tl.zeros((BLOCK_E,), tl.int32)
    before = tl.zeros((BLOCK_E,), tl.int32)
    for r0 in range(0, num_chunks, ROWS_G):
        rows = r0 + tl.arange(0, ROWS_G)
        c = tl.load(counts_ptr + rows[:, None] * BLOCK_E + experts[None, :], mask=rows[:, None] < num_chunks,
                    other=0)
        count += tl.sum(c, 0)
        before += tl.sum(tl.where(rows[:, None] < g, c, 0), 0)
    padded = (count + BLOCK - 1) // BLOCK * BLOCK
    end = tl.cumsum(padded, 0)  # (BLOCK_E,) one past each expert's group
    start = end - padded
    total = tl.sum(padded, 0)

    # the chunk's pairs, each at its expert's next free row: chunk order, then pair order inside a tile (stable)
    free = start + before
    for t in range(0, chunk, TILE):
        offs = g * chunk + t + tl.arange(0, TILE)
        e = tl.load(ids_ptr + offs, mask=offs < pairs, other=-1)
        hit = (e[:, None] == experts[None, :]).to(tl.int32)  # (TILE, BLOCK_E)
        earlier = tl.cumsum(hit, 0) - hit  # same-expert pairs ahead of each pair in the tile
        dest = tl.sum(hit * (earlier + free[None, :]), 1)
        tl.store(sorted_ptr + dest, offs, mask=(offs < pairs) & (tl.sum(hit, 1) > 0))  # no expert: no row
        free += tl.sum(hit, 0)

    # the program's share of blocks: their expert (-1 past the total) and the sentinel in their padding rows
    r = tl.arange(0, BLOCK)
    for b0 in range(0, blocks_per_prog, TILE_B):
        i = b0 + tl.arange(0, TILE_B)
        b = g * blocks_per_prog + i
        b_ok = (i < blocks_per_prog) & (b < num_blocks)
        row0 = b * BLOCK
        expert = tl.sum((end[None, :] <= row0[:, None]).to(tl.int32), 1)  # ends ascend: the group holding row0
        past = row0 >= total
        tl.store(block_expert_ptr + b, tl.where(past, -1, expert), mask=b_ok)
        mine = (experts[None, :] == expert[:, None]) & ~past[:, None]
        real = tl.sum(tl.where(mine, start + count, 0), 1)[:, None] - row0[:, None]  # real rows in this block
        sentinel = tl.zeros((TILE_B, BLOCK), tl.int32) + pairs
        tl.store(sorted_ptr + row0[:, None] + r[None, :], sentinel, mask=b_ok[:, None] & (r[None, :] >= real))
    if g == 0:
        tl.store(num_padded_ptr, total)


def align_config(pairs: int) -> tuple[int, int]:
    """(tile, chunk): a tile of 128 pairs x 128 experts is 16K one-hot lanes (64 registers a thread at 8 warps);
    chunks grow so that at most 128 programs run (131072 pairs: 128 chunks of 1024), which bounds the histogram
    rows each program sums."""
    tile = pow2(pairs, lo=16, hi=128)
    return tile, max(tile, pow2(triton.cdiv(pairs, 128)))


def align_kernel_configs(num_experts: int, block: int, tile: int) -> tuple[dict, dict]:
    """Compile-time parameters of the histogram and placement kernels; the (TILE, experts) one-hot tiles take
    8 warps from 16K lanes up. The placement sums the histograms 16 chunks at a time and fills 16 blocks at a time."""
    block_e = pow2(num_experts)
    warps = 8 if tile * block_e >= 16384 else 4
    count = dict(TILE=tile, BLOCK_E=block_e, num_warps=warps)
    return count, dict(count, BLOCK=block, ROWS_G=16, TILE_B=16)


def _align_launch(ids: torch.Tensor, num_experts: int, block: int, tile: int, chunk: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_align with explicit tile (pairs per vector step) and chunk (pairs per program, a multiple of tile)."""
    assert chunk % tile == 0, (chunk, tile)
    flat = ids.reshape(-1).contiguous()
    pairs = flat.numel()
    P = padded_size(pairs, num_experts, block)
    num_blocks = P // block
    num_chunks = max(1, triton.cdiv(pairs, chunk))
    count_config, place_config = align_kernel_configs(num_experts, block, tile)
    dev = ids.device
    counts = torch.empty((num_chunks, count_config["BLOCK_E"]), dtype=torch.int32, device=dev)
    sorted_ids = torch.empty((P,), dtype=torch.int32, device=dev)
    block_expert = torch.empty((num_blocks,), dtype=torch.int32, device=dev)
    num_padded = torch.empty((1,), dtype=torch.int32, device=dev)
    _align_count_kernel[(num_chunks,)](flat, counts, pairs, chunk, **count_config)
    _align_place_kernel[(num_chunks,)](
        flat, counts, sorted_ids, block_expert, num_padded, pairs, chunk, num_chunks, num_blocks,
        triton.cdiv(num_blocks, num_chunks), **place_config)
    return sorted_ids, block_expert, num_padded


def moe_align(ids: torch.Tensor, num_experts: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (N, k) int32 -> sorted_ids (P,) int32, block_expert (P / block,) int32, num_padded (1,) int32."""
    return _align_launch(ids, num_experts, block, *align_config(ids.numel()))


# ------------------------------------------------------------------------------------------- the grouped GEMMs


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, sorted_ptr, block_expert_ptr, act_ptr, s_ptr, H, INTER, pairs, top_k, num_blocks,
                    stride_we, stride_wn, stride_wk, stride_se, stride_sn,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    EVEN_K: tl.constexpr, ROUND_BF16: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr):
    """FP8: float8 experts with 128 x 128 block scales (E, ceil(2I/128), ceil(H/128)) at s_ptr; the gathered rows
    quantized per 128-channel group as each K block (BLOCK_K 128) loads (worker/fp8.py)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_blocks, tl.cdiv(INTER, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTER
    act_ptrs = act_ptr + rows[:, None].to(tl.int64) * INTER + cols[None, :]
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:  # past the last group: zeros, as the spec's padding rows
        tl.store(act_ptrs, tl.zeros((BLOCK_M, BLOCK_N), act_ptr.dtype.element_ty), mask=col_ok[None, :])
        return
    pair = tl.load(sorted_ptr + rows)
    real = pair < pairs  # padding rows load zeros and so write GELU(0) * 0 = 0
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (pair // top_k)[:, None].to(tl.int64) * H + ks[None, :]  # (BLOCK_M, BLOCK_K) gathered
    g_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn
              + ks[:, None] * stride_wk)  # (BLOCK_K, BLOCK_N): W_gate^T
    u_ptrs = g_ptrs + INTER * stride_wn  # the up half: rows I .. 2I - 1
    sg_ptrs = s_ptr + expert.to(tl.int64) * stride_se + (cols % INTER) // 128 * stride_sn  # (BLOCK_N,) FP8 scales
    su_ptrs = s_ptr + expert.to(tl.int64) * stride_se + (INTER + cols % INTER) // 128 * stride_sn
    gate = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=real[:, None], other=0.0)
            wg = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
            wu = tl.load(u_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks + k0 < H
            x = tl.load(x_ptrs, mask=real[:, None] & k_ok[None, :], other=0.0)
            wg = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            wu = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        gate, up = gate_up_step(x, wg, wu, gate, up, sg_ptrs, su_ptrs, k0 // BLOCK_K, FP8, UPCAST)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    if ROUND_BF16:  # the spec: bf16 GEMM outputs, bf16 GELU, bf16 product
        act = round_bf16(round_bf16(gelu_tanh(round_bf16(gate))) * round_bf16(up))
    else:
        act = gelu_tanh(gate) * up
    tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def _down_kernel(act_ptr, w_ptr, sorted_ptr, block_expert_ptr, out_ptr, s_ptr, H, INTER, pairs, num_blocks,
                 stride_we, stride_wn, stride_wk, stride_se, stride_sn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                 EVEN_K: tl.constexpr, ROUND_BF16: tl.constexpr, FP8: tl.constexpr, UPCAST: tl.constexpr):
    """FP8: as in _gate_up_kernel, scales (E, ceil(H/128), ceil(I/128))."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_blocks, tl.cdiv(H, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    pair = tl.load(sorted_ptr + rows)
    real = pair < pairs
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + rows[:, None].to(tl.int64) * INTER + ks[None, :]  # (BLOCK_M, BLOCK_K), the block's own rows
    w_ptrs = (w_ptr + expert.to(tl.int64) * stride_we + cols[None, :] * stride_wn
              + ks[:, None] * stride_wk)  # (BLOCK_K, BLOCK_N): W_down^T
    s_ptrs = s_ptr + expert.to(tl.int64) * stride_se + (cols % H) // 128 * stride_sn  # (BLOCK_N,) FP8 scales
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=real[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks + k0 < INTER
            a = tl.load(a_ptrs, mask=real[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = gemm_step(a, w, acc, s_ptrs, k0 // BLOCK_K, FP8, UPCAST)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if ROUND_BF16:
        acc = round_bf16(acc)  # exact in bf16 now: the store's conversion cannot truncate it differently
    out_ptrs = out_ptr + pair[:, None].to(tl.int64) * H + cols[None, :]  # row pair = token * k + slot
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=real[:, None] & col_ok[None, :])


def layout_block(sorted_ids: torch.Tensor, block_expert: torch.Tensor) -> int:
    """The aligned layout's block (moe_align's `block`): the M tile of both grouped GEMMs."""
    block = sorted_ids.shape[0] // block_expert.shape[0]
    assert block * block_expert.shape[0] == sorted_ids.shape[0] and block >= 16 and block & (block - 1) == 0, (
        f"the aligned layout's block must be a power of two >= 16 (tl.dot), got {block}")
    return block


def gate_up_config(block: int, inter: int, hidden: int, dtype: torch.dtype, fp8: bool = False) -> dict:
    """64 x 64 tiles with two float32 accumulators (the gate and the up half: 128 columns of wgmma work per step),
    3 stages. bf16: 4 warps (one warp group), k 64 deep, (x 8 KB + 2 x 8 KB of weights) = 24 KB a stage. fp8: k 128
    deep (the scale block), (x 16 KB in bf16 + 2 x 8 KB of float8 weights) = 32 KB a stage, and 8 warps: the two
    per-block products and the x tile being quantized spilled 80 bytes a thread at 4 (184 registers at 8)."""
    config = _gemm_config(block, inter, hidden, 64, dtype, fp8)
    return dict(config, num_warps=8) if fp8 else config


def down_config(block: int, hidden: int, inter: int, dtype: torch.dtype, fp8: bool = False) -> dict:
    """64 x 128 output tiles (one accumulator: 64 registers a thread at 4 warps), 3 stages over I = 704: bf16 k 64
    deep (11 steps, (8 + 16) KB a stage); fp8 k 128 deep (6 steps, the last half masked; (16 + 16) KB a stage)."""
    return _gemm_config(block, hidden, inter, 128, dtype, fp8)


def _gemm_config(block: int, n: int, k: int, block_n: int, dtype: torch.dtype, fp8: bool) -> dict:
    """Tiles of a grouped GEMM with n output columns and depth k, clamped for small shapes (tests); fp8 walks k
    128 deep, one scale block a step."""
    block_k = SCALE_BLOCK if fp8 else pow2(k, lo=16, hi=64)
    return dict(BLOCK_M=block, BLOCK_N=pow2(n, lo=16, hi=block_n), BLOCK_K=block_k, GROUP_M=8,
                EVEN_K=k % block_k == 0, ROUND_BF16=dtype == torch.bfloat16, FP8=fp8, UPCAST=interpreting(),
                num_warps=4, num_stages=3)


def _scale_args(scale: torch.Tensor | None, fallback: torch.Tensor) -> tuple:
    """The kernels' scale pointer and its expert and block-row strides (unread without FP8)."""
    if scale is None:
        return fallback, 0, 0
    assert scale.stride(-1) == 1, "fp8 scales need unit stride along K"
    return scale, scale.stride(0), scale.stride(1)


def gate_up_launch(x: torch.Tensor, w_gate_up: torch.Tensor, scale: torch.Tensor | None, sorted_ids: torch.Tensor,
                   block_expert: torch.Tensor, top_k: int, config: dict) -> torch.Tensor:
    """The gate/up GEMM with `config` (gate_up_config); `scale`: the block scales of float8 experts (FP8)."""
    x = x.contiguous()
    N, H = x.shape
    inter = w_gate_up.shape[1] // 2
    act = torch.empty((sorted_ids.shape[0], inter), dtype=x.dtype, device=x.device)
    num_blocks = block_expert.shape[0]
    grid = (num_blocks * triton.cdiv(inter, config["BLOCK_N"]),)
    if num_blocks:
        s, s_e, s_n = _scale_args(scale, x)
        _gate_up_kernel[grid](x, w_gate_up, sorted_ids, block_expert, act, s, H, inter, N * top_k, top_k, num_blocks,
                              *w_gate_up.stride(), s_e, s_n, **config)
    return act


def down_launch(act: torch.Tensor, w_down: torch.Tensor, scale: torch.Tensor | None, sorted_ids: torch.Tensor,
                block_expert: torch.Tensor, num_tokens: int, top_k: int, config: dict) -> torch.Tensor:
    """The down GEMM with `config` (down_config); `scale`: the block scales of float8 experts (FP8)."""
    act = act.contiguous()
    H, inter = w_down.shape[1], w_down.shape[2]
    out = torch.empty((num_tokens * top_k, H), dtype=act.dtype, device=act.device)
    num_blocks = block_expert.shape[0]
    grid = (num_blocks * triton.cdiv(H, config["BLOCK_N"]),)
    if num_blocks:  # every pair is a real row of exactly one block: out is fully written
        s, s_e, s_n = _scale_args(scale, act)
        _down_kernel[grid](act, w_down, sorted_ids, block_expert, out, s, H, inter, num_tokens * top_k, num_blocks,
                           *w_down.stride(), s_e, s_n, **config)
    return out.view(num_tokens, top_k, H)


def moe_gate_up(x: torch.Tensor, w_gate_up: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor,
                num_padded: torch.Tensor, top_k: int) -> torch.Tensor:
    """x (N, H), w_gate_up (E, 2I, H) -> act (P, I) in x's dtype (padding rows: zeros)."""
    check_dtypes(x, w_gate_up)
    config = gate_up_config(layout_block(sorted_ids, block_expert), w_gate_up.shape[1] // 2, x.shape[1], x.dtype)
    return gate_up_launch(x, w_gate_up, None, sorted_ids, block_expert, top_k, config)


def moe_down(act: torch.Tensor, w_down: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor,
             num_padded: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """act (P, I), w_down (E, H, I) -> (N, k, H): each pair's expert output at [token, slot] (unweighted)."""
    check_dtypes(act, w_down)
    config = down_config(layout_block(sorted_ids, block_expert), w_down.shape[1], w_down.shape[2], act.dtype)
    return down_launch(act, w_down, None, sorted_ids, block_expert, num_tokens, top_k, config)
