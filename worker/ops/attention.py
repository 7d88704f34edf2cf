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


def allowed_keys(L: int, kv_len: torch.Tensor, q_start: torch.Tensor, width: int, causal: bool, window: int
                 ) -> torch.Tensor:
    """(B, L, width) bool: which keys query j of row b may attend."""
    t = torch.arange(width, device=kv_len.device)[None, None, :]
    mask = t < kv_len[:, None, None]
    if causal:
        qpos = q_start[:, None, None] + torch.arange(L, device=kv_len.device)[None, :, None]
        mask = mask & (t <= qpos)
        if window > 0:
            mask = mask & ((qpos - t) < window)
    return mask


@op("attention", mutates_args=())
def attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
              kv_len: torch.Tensor, q_start: torch.Tensor, causal: bool, window: int, scale: float) -> torch.Tensor:
    """q (B, L, Hq, D); pools (S, Hkv, capacity, D); slots, kv_len, q_start (B,) int64 -> (B, L, Hq, D).

    Query j of row b sits at key index q_start[b] + j (causal passes only); with `causal` it sees keys
    t <= q_start[b] + j, and with `window` > 0 only those with (q_start[b] + j) - t < window. Keys past
    kv_len[b] (or the capacity) are never seen; a query that may see no key gets zeros.
    """
    B, L, Hq, D = q.shape
    kv_len = kv_len.clamp(max=k_pool.shape[2])
    width = int(kv_len.max()) if B else 0
    if width == 0:
        return torch.zeros_like(q)
    keys = k_pool[:, :, :width].index_select(0, slots).to(q.dtype)  # (B, Hkv, width, D): only what is attended
    values = v_pool[:, :, :width].index_select(0, slots).to(q.dtype)
    mask = allowed_keys(L, kv_len, q_start, width, causal, window)  # (B, L, width)
    full = not causal and bool((kv_len == width).all())  # the decoder with rows of one length: no mask at all
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=None if full else mask[:, None],
                                         scale=scale, enable_gqa=True)  # (B, Hq, L, D)
    out = out.transpose(1, 2)
    if not full:  # a query with nothing to see: zeros (sdpa gives NaN there)
        out = out.masked_fill(~mask.any(-1)[:, :, None, None], 0.0)
    return out.contiguous()


@attention.register_fake
def _(q, k_pool, v_pool, slots, kv_len, q_start, causal, window, scale):
    return torch.empty_like(q)
