"""Triton twin of `dgserve::attention` (worker/ops/attention.py is the spec): flash attention over each row's
true length in the KV pool; the query heads of one KV head packed into one tile; no mask tensor, no K/V copies.

One program = one query tile of one (row b, KV head h): its BLOCK_M tile rows are (query position j, group head g)
pairs, m = j * G + g for query head h * G + g, so each K/V tile it loads serves the whole group, and it loads each
K/V tile of its range once. Grid (query tiles, KV heads x D_SPLIT, rows): query tiles fastest, so the programs that
read one row's K/V run together and share L2. With D_SPLIT 2 (head dim 512) two programs share a tile, each writing
half of the output columns (see `config`). Lengths are read in the kernel from device tensors (the grid depends on
shapes only, so launches are CUDA-graph capturable); kv_len is clamped to the slot's capacity, as the spec's slice.
The K loop over slot slots[b]:
    decoder (bidirectional): keys [0, kv_len[b]): the full BLOCK_N tiles without masks, then one masked tail tile;
    encoder (causal): up to min(kv_len[b], q_start[b] + the tile's last query + 1); with a window, from
        q_start[b] + the tile's first query - window + 1 (rounded down to a tile): whole tiles outside the allowed
        range are never loaded; every tile is masked per element.
Online softmax in float32 (base 2, `scale` folded into log2 e); P is rounded to the operand dtype before P @ V, as
flash kernels and torch's CPU SDPA do. A query with no key to see (kv_len 0: padding rows) gets zeros, as the spec.

Under TRITON_INTERPRET=1 (tests on the CPU) the interpreter's bf16 `tl.dot` multiplies the raw bits and its
bf16 casts truncate, so there the operands are bf16 values held in float32, rounded to nearest-even with bit
arithmetic: the same numbers a GPU's bf16 wgmma multiplies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from worker.ops.triton.common import interpreting, round_bf16

LOG2E = 1.4426950408889634
DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _operand(x, DOT_DTYPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """x as a tl.dot operand in the query's dtype (see the module docstring for ROUND_BF16)."""
    if ROUND_BF16:
        y = round_bf16(x.to(tl.float32))
    else:
        y = x.to(DOT_DTYPE)
    return y


@triton.jit
def _attend(acc, l_i, m_i, q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, lo, hi, qpos, n_keys, window, qk_scale,
            offs_d, d_ok, offs_dv, dv_ok,
            BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
            DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Online softmax over key tiles [lo, hi) (BLOCK_N apart): acc (BLOCK_M, D_OUT), l_i and m_i (BLOCK_M,) f32.
    Keys are read at offs_d (all of D), values at offs_dv (this program's part of D)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        t = start + offs_n  # (BLOCK_N,) key indices
        if MASKED:
            k_ok = (t < n_keys)[:, None] & d_ok[None, :]
            v_ok = (t < n_keys)[:, None] & dv_ok[None, :]
        else:
            k_ok = d_ok[None, :]
            v_ok = dv_ok[None, :]
        k = tl.load(k_base + t[:, None] * sk_t + offs_d[None, :] * sk_d, mask=k_ok, other=0.0)
        s = tl.dot(q, tl.trans(_operand(k, DOT_DTYPE, ROUND_BF16)), input_precision=PRECISION) * qk_scale
        if MASKED:  # (BLOCK_M, BLOCK_N)
            ok = (t < n_keys)[None, :]
            if CAUSAL:
                ok = ok & (t[None, :] <= qpos[:, None])
                if HAS_WINDOW:
                    ok = ok & ((qpos[:, None] - t[None, :]) < window)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # a query that has seen no key yet keeps m = -inf: shift by 0 so that exp2 gives 0, not NaN
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            shift = m_new
        alpha = tl.exp2(m_i - shift)
        p = tl.exp2(s - shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + t[:, None] * sv_t + offs_dv[None, :] * sv_d, mask=v_ok, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(_operand(p, DOT_DTYPE, ROUND_BF16), _operand(v, DOT_DTYPE, ROUND_BF16), acc,
                     input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, slots_ptr, kv_len_ptr, q_start_ptr,
    L, capacity, window, qk_scale,
    sq_b, sq_l, sq_h, sq_d, sk_s, sk_h, sk_t, sk_d, sv_s, sv_h, sv_t, sv_d, so_b, so_l, so_h, so_d,
    D: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1) // D_SPLIT
    part = tl.program_id(1) % D_SPLIT  # which D / D_SPLIT columns of the output this program writes
    b = tl.program_id(2).to(tl.int64)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    n_keys = tl.minimum(tl.load(kv_len_ptr + b).to(tl.int32), capacity)  # never past the slot, as the spec's slice

    m0 = tile * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    j = offs_m // GROUP  # (BLOCK_M,) query position
    head = kvh * GROUP + offs_m % GROUP  # (BLOCK_M,) query head
    row_ok = j < L
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    offs_dv = part * (D_PAD // D_SPLIT) + tl.arange(0, D_PAD // D_SPLIT)
    dv_ok = offs_dv < D
    q_rows = b * sq_b + j * sq_l + head * sq_h
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :] * sq_d, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = _operand(q, DOT_DTYPE, ROUND_BF16)  # (BLOCK_M, D_PAD)
    k_base = k_ptr + slot * sk_s + kvh * sk_h
    v_base = v_ptr + slot * sv_s + kvh * sv_h

    acc = tl.zeros((BLOCK_M, D_PAD // D_SPLIT), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    if CAUSAL:
        q_start = tl.load(q_start_ptr + b).to(tl.int32)
        qpos = q_start + j  # (BLOCK_M,) key index of each query
        last = tl.minimum((m0 + BLOCK_M - 1) // GROUP, L - 1)
        hi = tl.minimum(n_keys, q_start + last + 1)
        if HAS_WINDOW:
            lo = tl.maximum(q_start + m0 // GROUP - window + 1, 0) // BLOCK_N * BLOCK_N
        else:
            lo = 0
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, lo, hi, qpos, n_keys,
                                window, qk_scale, offs_d, d_ok, offs_dv, dv_ok, BLOCK_N, True, True, HAS_WINDOW,
                                DOT_DTYPE, PRECISION, ROUND_BF16)
    else:
        full = n_keys // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, 0, full, j, n_keys,
                                window, qk_scale, offs_d, d_ok, offs_dv, dv_ok, BLOCK_N, False, False, False,
                                DOT_DTYPE, PRECISION, ROUND_BF16)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, full, n_keys, j, n_keys,
                                window, qk_scale, offs_d, d_ok, offs_dv, dv_ok, BLOCK_N, True, False, False,
                                DOT_DTYPE, PRECISION, ROUND_BF16)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no key seen: acc is 0, and so is the output
    if ROUND_BF16:
        out = round_bf16(out)  # exact in bf16 now: the store's (truncating) conversion cannot change it
    o_rows = b * so_b + j * so_l + head * so_h
    tl.store(o_ptr + o_rows[:, None] + offs_dv[None, :] * so_d, out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dv_ok[None, :])


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    d_split: int = 1  # programs sharing one tile's output columns (each computes Q K^T in full)


def config(d_pad: int, itemsize: int) -> Config:
    """Tiles per head-dim class: fixed (no autotuning at start-up) and independent of the batch size, so that a
    row's result does not depend on how many rows share the launch. Shared memory per program: Q (BLOCK_M x D)
    + num_stages x (K tile BLOCK_N x D + V tile BLOCK_N x D / D_SPLIT); an H200 SM has 228 KB (227 KB a block).
    Each choice below compiles for sm90 to wgmma (Triton gives each 4-warp group 64 tile rows), within shared
    memory, with no spills in the K loop (the served ones are checked by test_triton_attention.py's
    test_kernels_compile_for_sm90_within_shared_memory_and_registers; D = 256 keeps 16 bytes a thread outside it).

    16-bit (the served dtypes):
      D <= 128: 64 x 64, 4 warps, 2 stages: 16 + 2 x 32 = 80 KB.
      D = 256 (sliding layers): 128 x 64, 8 warps, 2 stages: 64 + 2 x 64 = 192 KB; the (128, 256) f32
        accumulator is 128 registers a thread. Two warpgroups of 64 rows each take Q K^T as 64 x 64 wgmma (with
        64 rows and 8 warps Triton splits N instead: 64 x 32 pieces), and K/V are read from L2 half as often.
      D = 512 (global layers): D_SPLIT 2: two programs per tile, each computing Q K^T in full (1.5x the FLOPs)
        and P @ V for 256 of the 512 output columns; 128 x 32, 8 warps, 2 stages: 128 + 2 x (32 + 16) = 224 KB.
        Unsplit, the (64, 512) f32 accumulator alone is 128 registers a thread at 8 warps; compiled (64 x 32
        tiles), that spilled to a 448-byte stack with 116 spill loads and stores in each K-loop iteration, and
        Q K^T went to 64 x 16 wgmma pieces. A (128, 256) accumulator per program has the D = 256 register
        budget and 64 x 32 wgmma for Q K^T. BLOCK_N 64 does not fit two stages (128 + 2 x 96 = 320 KB).
    32-bit (exact-mode checks; an IEEE fp32 dot runs on CUDA cores, not tensor cores, with its operands in
      registers): 32 x 16, 8 warps, 2 stages, D split in two from 256: the larger tiles spilled.
    """
    if d_pad > 512:
        raise ValueError(f"attention supports head dims up to 512, not {d_pad}")
    if itemsize >= 4:
        return Config(32, 16, 8, 2, 2 if d_pad >= 256 else 1)
    if d_pad <= 128:
        return Config(64, 64, 4, 2)
    if d_pad == 256:
        return Config(128, 64, 8, 2)
    return Config(128, 32, 8, 2, 2)


def launch(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, kv_len: torch.Tensor,
           q_start: torch.Tensor, causal: bool, window: int, scale: float,
           out: torch.Tensor) -> tuple[tuple[int, int, int], tuple, dict]:
    """The kernel's grid, arguments and keyword arguments for one call (shapes only: no host sync)."""
    B, L, Hq, D = q.shape
    Hkv = k_pool.shape[1]
    if Hq % Hkv or k_pool.shape[3] != D or v_pool.shape[1:] != k_pool.shape[1:]:
        raise ValueError(f"attention: q {tuple(q.shape)} does not fit pools {tuple(k_pool.shape)}, "
                         f"{tuple(v_pool.shape)}")
    group = Hq // Hkv
    rows = L * group  # tile rows per (row, KV head)
    d_pad = max(16, triton.next_power_of_2(D))
    cfg = config(d_pad, q.element_size())
    interpret = interpreting()
    if q.dtype not in DOT_DTYPES:
        raise ValueError(f"attention: q's dtype must be one of {list(DOT_DTYPES)}, not {q.dtype}")
    dot_dtype = tl.float32 if interpret else DOT_DTYPES[q.dtype]
    grid = (triton.cdiv(rows, cfg.block_m), Hkv * cfg.d_split, B)
    args = (q, k_pool, v_pool, out, slots, kv_len, q_start, L, k_pool.shape[2], int(window), float(scale) * LOG2E,
            *q.stride(), *k_pool.stride(), *v_pool.stride(), *out.stride())
    kwargs = dict(
        D=D, D_PAD=d_pad, GROUP=group, CAUSAL=bool(causal), HAS_WINDOW=bool(causal) and window > 0,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D_SPLIT=cfg.d_split,
        DOT_DTYPE=dot_dtype, PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
        ROUND_BF16=interpret and q.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return grid, args, kwargs


def attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
              kv_len: torch.Tensor, q_start: torch.Tensor, causal: bool, window: int, scale: float) -> torch.Tensor:
    """q (B, L, Hq, D); pools (S, Hkv, capacity, D); slots, kv_len, q_start (B,) int64 -> (B, L, Hq, D)."""
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    grid, args, kwargs = launch(q, k_pool, v_pool, slots, kv_len, q_start, causal, window, scale, out)
    _attention_kernel[grid](*args, **kwargs)
    return out
