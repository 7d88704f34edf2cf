"""Query/key norms, rotary embeddings, and the new keys and values written into the KV pool in place.

One kernel per attention layer replaces the reference's q_norm, k_norm, v_norm, two RoPE applications, the
transposes and the `torch.cat` of the whole cache with the canvas: the canvas's keys and values go straight into
the request's pool slot after what it holds, where the attention kernel reads them with the cache.
"""

from __future__ import annotations

import torch

from worker.ops.norms import rms
from worker.ops.registry import op


def cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype):
    """The reference's RoPE tables: computed in float32, rounded to the model dtype. -> cos, sin (B, L, 1, D)."""
    freqs = positions[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype)[:, :, None, :], (emb.sin() * scale).to(dtype)[:, :, None, :]


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference's `apply_rotary_pos_emb` in x's dtype: x (B, L, heads, D) -> (B, L, heads, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def store(pool: torch.Tensor, new: torch.Tensor, slots: torch.Tensor, start: torch.Tensor) -> None:
    """pool[slots[b], :, start[b] + j] = new[b, j] for every j with start[b] + j < capacity.

    pool (S, heads, capacity, D), new (B, L, heads, D), slots and start (B,) int64.
    """
    B, L = new.shape[:2]
    pos = start[:, None] + torch.arange(L, device=new.device)[None, :]  # (B, L)
    rows = slots[:, None].expand(B, L)
    fits = pos < pool.shape[2]
    pool[rows[fits], :, pos[fits]] = new[fits].to(pool.dtype)


@op("qk_norm_rope_store", mutates_args=("k_pool", "v_pool"))
def qk_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, q_weight: torch.Tensor,
                       k_weight: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, rope_scale: float,
                       k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, start: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """q (B*L, Hq*D), k and v (B*L, Hkv*D) projections (v None where values are the keys: `attention_k_eq_v`)
    -> the normed, rotated queries (B, L, Hq, D).

    Writes the normed, rotated keys and the normed (unscaled) values of row b into slot slots[b] of the pools
    (S, Hkv, capacity, D), at positions start[b] .. start[b] + L - 1 (what does not fit is dropped).
    """
    B, L = positions.shape
    D = q_weight.shape[0]
    cos, sin = cos_sin(positions, inv_freq, rope_scale, q.dtype)
    qs = rotary(rms(q.view(B, L, -1, D), q_weight, eps), cos, sin)
    ks = k.view(B, L, -1, D)
    values = rms(ks if v is None else v.view(B, L, -1, D), None, eps)
    keys = rotary(rms(ks, k_weight, eps), cos, sin)
    store(k_pool, keys, slots, start)
    store(v_pool, values, slots, start)
    return qs


@qk_norm_rope_store.register_fake
def _(q, k, v, q_weight, k_weight, positions, inv_freq, rope_scale, k_pool, v_pool, slots, start, eps):
    B, L = positions.shape
    D = q_weight.shape[0]
    return q.new_empty((B, L, q.shape[1] // D, D))
