"""Attention of a block of queries over each row's true length in the KV pool: no dense mask, no K/V copies.

Row b reads slot slots[b] of the pools, keys 0 .. kv_len[b] - 1 (its cache, then the block's own keys that
`qk_norm_rope_store` has just written after it). The decoder attends to all of them (bidirectional over the
canvas, read-only over the cache); the encoder is causal, with the sliding window where the layer has one. Query
heads share their KV head (grouped-query attention) without materialising repeated keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.ops.registry import op


def allowed_keys(L: int, n: int, q_start: int, causal: bool, window: int, device) -> torch.Tensor | None:
    """(L, n) bool: which keys query j may attend (None: all of them)."""
    if not causal:
        return None
    t = torch.arange(n, device=device)[None, :]
    qpos = q_start + torch.arange(L, device=device)[:, None]
    mask = t <= qpos
    if window > 0:
        mask &= (qpos - t) < window
    return mask


@op("attention", mutates_args=())
def attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
              kv_len: torch.Tensor, q_start: torch.Tensor, causal: bool, window: int, scale: float) -> torch.Tensor:
    """q (B, L, Hq, D); pools (S, Hkv, capacity, D); slots, kv_len, q_start (B,) int64 -> (B, L, Hq, D).

    Query j of row b sits at key index q_start[b] + j (causal passes only); with `causal` it sees keys
    t <= q_start[b] + j, and with `window` > 0 only those with (q_start[b] + j) - t < window.
    """
    B, L, Hq, D = q.shape
    out = torch.empty_like(q)
    for b, (slot, n, start) in enumerate(zip(slots.tolist(), kv_len.tolist(), q_start.tolist(), strict=True)):
        keys, values = k_pool[slot, :, :n], v_pool[slot, :, :n]  # (Hkv, n, D)
        mask = allowed_keys(L, n, start, causal, window, q.device)
        o = F.scaled_dot_product_attention(q[b].transpose(0, 1), keys.to(q.dtype), values.to(q.dtype),
                                           attn_mask=mask, scale=scale, enable_gqa=True)  # (Hq, L, D)
        out[b] = o.transpose(0, 1)
    return out


@attention.register_fake
def _(q, k_pool, v_pool, slots, kv_len, q_start, causal, window, scale):
    return torch.empty_like(q)
