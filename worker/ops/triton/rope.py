"""Triton kernel of `qk_norm_rope_store` (`worker/ops/rope.py` is its specification).

Grid (tokens, q head blocks + kv head blocks). A program holds a block of heads of one token as two
(heads, D/2) halves (RoPE pairs element d with d + D/2, and cos/sin are the same for both halves), so each
input element is loaded once, and computes the token's cos/sin once for all its heads:
- a q program norms its heads (weight q_weight), rotates them and writes them to the (B, L, Hq, D) output;
- a kv program norms and rotates the keys into k_pool and norms the values (no weight; the raw keys where `v` is
  None) into v_pool, both at [slots[b], head, start[b] + j, :], masked off where start[b] + j >= capacity.
slots and start are read in the kernel (no host sync; CUDA-graph capturable).

Roundings mirror the spec in the model dtype: each norm, cos and sin (computed in float32), each product of the
rotation and their sum; then the pool's dtype on the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.ops.triton.common import dtype_mode, round_to, rows
from worker.ops.triton.norms import inv_rms_of

TILE = 2048  # values per half-tile of a program: 16 query heads of D=256 (or 8 of 512) per program, 8 warps


@triton.jit
def _rotate(x1, x2, cos, sin, MODE: tl.constexpr):
    """x * cos + rotate_half(x) * sin, each product and the sum rounded to the model dtype."""
    y1 = round_to(round_to(x1 * cos, MODE) + round_to(-x2 * sin, MODE), MODE)
    y2 = round_to(round_to(x2 * cos, MODE) + round_to(x1 * sin, MODE), MODE)
    return y1, y2


@triton.jit
def _load_heads(ptr, heads, d, mask, half, D, eps):
    """A (heads, D/2) x 2 tile at ptr + head * D, float32, and each head's (mean(x^2) + eps)^-0.5 (heads, 1)."""
    offs = heads[:, None] * D + d[None, :]
    x1 = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + offs + half, mask=mask, other=0.0).to(tl.float32)
    r = inv_rms_of(tl.sum(x1 * x1, axis=1, keep_dims=True) + tl.sum(x2 * x2, axis=1, keep_dims=True), D, eps)
    return x1, x2, r


@triton.jit
def _weighted(x1, x2, r, w_ptr, d, half, MODE: tl.constexpr):
    """rms(x, w) of both halves, rounded to the model dtype."""
    dm = d < half
    w1 = tl.load(w_ptr + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w_ptr + half + d, mask=dm, other=0.0).to(tl.float32)[None, :]
    return round_to(x1 * r * w1, MODE), round_to(x2 * r * w2, MODE)


@triton.jit
def _store_halves(ptr, offs, y1, y2, half, mask, MODE: tl.constexpr):
    dtype = ptr.dtype.element_ty
    tl.store(ptr + offs, round_to(y1, MODE).to(dtype), mask=mask)
    tl.store(ptr + offs + half, round_to(y2, MODE).to(dtype), mask=mask)


@triton.jit
def _queries(q_ptr, qw_ptr, out_ptr, t, first, Hq, D, half, d, cos, sin, eps, MODE: tl.constexpr,
             HEADS: tl.constexpr):
    """Query heads first .. first + HEADS - 1 of token t: normed, rotated, into the (B, L, Hq, D) output."""
    heads = first + tl.arange(0, HEADS)
    mask = (heads < Hq)[:, None] & (d < half)[None, :]
    x1, x2, r = _load_heads(q_ptr, heads, d, mask, half, D, eps)
    y1, y2 = _weighted(x1, x2, r, qw_ptr, d, half, MODE)
    y1, y2 = _rotate(y1, y2, cos, sin, MODE)
    _store_halves(out_ptr + t * Hq * D, heads[:, None] * D + d[None, :], y1, y2, half, mask, MODE)


@triton.jit
def _keys_values(k_ptr, v_ptr, kw_ptr, k_pool, v_pool, pos, first, Hkv, D, half, d, cos, sin, capacity,
                 kp1, vp1, eps, HAS_V: tl.constexpr, MODE: tl.constexpr, POOL_MODE: tl.constexpr,
                 HEADS: tl.constexpr):
    """KV heads first .. first + HEADS - 1 of one token: keys normed and rotated into k_pool, values normed into
    v_pool (k_pool and v_pool already point at [slot, 0, pos, 0]); nothing where pos >= capacity."""
    heads = first + tl.arange(0, HEADS)
    fits = (heads < Hkv) & (pos + 0 * heads < capacity)  # (HEADS,): a scalar mask here trips the interpreter
    mask = fits[:, None] & (d < half)[None, :]
    x1, x2, r = _load_heads(k_ptr, heads, d, mask, half, D, eps)
    y1, y2 = _weighted(x1, x2, r, kw_ptr, d, half, MODE)
    y1, y2 = _rotate(y1, y2, cos, sin, MODE)
    _store_halves(k_pool, heads[:, None].to(tl.int64) * kp1 + d[None, :], y1, y2, half, mask, POOL_MODE)
    if HAS_V:  # values: their own norm, no weight; else the keys' norm without the weight
        x1, x2, r = _load_heads(v_ptr, heads, d, mask, half, D, eps)
    _store_halves(v_pool, heads[:, None].to(tl.int64) * vp1 + d[None, :], round_to(x1 * r, MODE),
                  round_to(x2 * r, MODE), half, mask, POOL_MODE)


@triton.jit
def _qk_norm_rope_store_kernel(
    q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, pos_ptr, inv_freq_ptr, k_pool, v_pool, slots_ptr, start_ptr, out_ptr,
    L, Hq, Hkv, D, half, s_q, s_k, s_v, kp0, kp1, kp2, vp0, vp1, vp2, capacity, rope_scale, eps,
    HAS_V: tl.constexpr, MODE: tl.constexpr, POOL_MODE: tl.constexpr,
    QHB: tl.constexpr, KHB: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)  # token b * L + j
    hb = tl.program_id(1)
    nqb = tl.cdiv(Hq, QHB)
    d = tl.arange(0, BLOCK_HALF)
    freqs = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + d, mask=d < half, other=0.0)
    cos = round_to(tl.cos(freqs) * rope_scale, MODE)[None, :]
    sin = round_to(tl.sin(freqs) * rope_scale, MODE)[None, :]
    # the branches assign nothing: Triton merges names assigned in both branches of a runtime `if`
    if hb < nqb:
        _queries(q_ptr + t * s_q, qw_ptr, out_ptr, t, hb * QHB, Hq, D, half, d, cos, sin, eps, MODE, QHB)
    else:
        b = t // L
        pos = tl.load(start_ptr + b) + t % L
        slot = tl.load(slots_ptr + b)
        _keys_values(k_ptr + t * s_k, v_ptr + t * s_v, kw_ptr, k_pool + slot * kp0 + pos * kp2,
                     v_pool + slot * vp0 + pos * vp2, pos, (hb - nqb) * KHB, Hkv, D, half, d, cos, sin,
                     capacity, kp1, vp1, eps, HAS_V, MODE, POOL_MODE, KHB)


def _heads_per_program(heads: int, block_half: int) -> int:
    return min(triton.next_power_of_2(heads), max(1, TILE // block_half))


def qk_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, q_weight: torch.Tensor,
                       k_weight: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rope_scale: float,
                       k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, start: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """q (B*L, Hq*D), k and v (B*L, Hkv*D) -> the normed, rotated queries (B, L, Hq, D); keys and values into the
    pools (S, Hkv, capacity, D) of slots[b] at start[b] + j (what does not fit is dropped)."""
    B, L = positions.shape
    D = q_weight.shape[0]
    if D % 2:
        raise ValueError(f"RoPE needs an even head dim, not {D}")
    if k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("the KV pools need unit stride in their head dim")
    q, k = rows(q), rows(k)
    v = None if v is None else rows(v)
    Hq, Hkv = q.shape[1] // D, k.shape[1] // D
    out = torch.empty((B, L, Hq, D), dtype=q.dtype, device=q.device)
    if B * L == 0:
        return out
    block_half = triton.next_power_of_2(D // 2)
    qhb, khb = _heads_per_program(Hq, block_half), _heads_per_program(Hkv, block_half)
    grid = (B * L, triton.cdiv(Hq, qhb) + triton.cdiv(Hkv, khb))
    _qk_norm_rope_store_kernel[grid](
        q, k, k if v is None else v, q_weight, k_weight, positions.contiguous(), inv_freq.float().contiguous(),
        k_pool, v_pool, slots.contiguous(), start.contiguous(), out,
        L, Hq, Hkv, D, D // 2, q.stride(0), k.stride(0), k.stride(0) if v is None else v.stride(0),
        *k_pool.stride()[:3], *v_pool.stride()[:3], k_pool.shape[2], rope_scale, eps,
        HAS_V=v is not None, MODE=dtype_mode(q.dtype), POOL_MODE=dtype_mode(k_pool.dtype),
        QHB=qhb, KHB=khb, BLOCK_HALF=block_half, num_warps=8 if qhb * block_half >= TILE else 4,
    )
    return out
