"""A preallocated key/value pool: one slot per request, shaped for batched decoder steps.

Each request owns a slot. Full-attention layers keep every encoded token; sliding-window layers keep
only the last `sliding_window - 1` tokens, exactly what transformers' `DynamicSlidingWindowLayer`
keeps, so the decoder sees per row what the reference decoder sees. Active requests occupy slots
0..n-1, so a decoder step reads `pool[:n]` without gathering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _LayerView:
    """What the decoder attention reads from `cache.layers[i]`."""

    keys: torch.Tensor
    values: torch.Tensor


class DecoderCacheView:
    """Read-only view of the first `n` slots, in the shape transformers' decoder attention expects."""

    is_compileable = False

    def __init__(self, layers: list[_LayerView]):
        self.layers = layers


class KVPool:
    def __init__(self, text_config, rows: int, max_context: int, device, dtype: torch.dtype, spare: bool = False):
        self.text_config = text_config
        self.rows = rows
        # `spare`: one more slot that no request owns, where fixed-shape passes send their padding rows
        self.spare_slot: int | None = rows if spare else None
        self.max_context = max_context
        self.window = text_config.sliding_window
        self.layer_types: list[str] = list(text_config.layer_types)
        self.sliding = [t == "sliding_attention" for t in self.layer_types]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for i, sliding in enumerate(self.sliding):
            layer_cfg = text_config.per_layer_config[i]
            cap = min(self.window - 1, max_context) if sliding else max_context
            shape = (rows + int(spare), layer_cfg.num_key_value_heads, cap, layer_cfg.head_dim)
            self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
            self.values.append(torch.zeros(shape, device=device, dtype=dtype))
        self.total = [0] * (rows + int(spare))  # tokens encoded into each slot

    @property
    def bytes_per_row(self) -> int:
        return sum(k[0].numel() * k.element_size() * 2 for k in self.keys)

    def capacity(self, kind: str) -> int:
        i = self.layer_types.index(kind)
        return self.keys[i].shape[2]

    def held_kind(self, slot: int, kind: str) -> int:
        """How many positions layers of `kind` hold for `slot` (sliding ones keep window - 1 at most)."""
        total = self.total[slot]
        return min(total, self.window - 1) if kind == "sliding_attention" else total

    def held(self, slot: int, layer: int) -> int:
        return self.held_kind(slot, self.layer_types[layer])

    def move(self, src: int, dst: int) -> None:
        """Move a slot's contents (to keep active slots contiguous)."""
        if src == dst:
            return
        for i in range(len(self.keys)):
            n = self.held(src, i)
            self.keys[i][dst, :, :n] = self.keys[i][src, :, :n]
            self.values[i][dst, :, :n] = self.values[i][src, :, :n]
        self.total[dst] = self.total[src]
        self.total[src] = 0

    def release(self, slot: int) -> None:
        self.total[slot] = 0

    def decoder_view(self, n: int) -> tuple[DecoderCacheView, dict[str, torch.Tensor | None]]:
        """The first `n` slots for one decoder step, and per layer type a (n, 1, 1, kv) bool key mask.

        The masks are None where no row has padding (every row holds the same number of positions).
        """
        layers = []
        masks: dict[str, torch.Tensor | None] = {}
        for i in range(len(self.keys)):
            lengths = [self.held(s, i) for s in range(n)]
            longest = max(lengths)
            layers.append(_LayerView(self.keys[i][:n, :, :longest], self.values[i][:n, :, :longest]))
            kind = self.layer_types[i]
            if kind in masks:
                continue
            if min(lengths) == longest:
                masks[kind] = None
            else:
                held = torch.tensor(lengths, device=self.keys[i].device)
                masks[kind] = (torch.arange(longest, device=held.device)[None, :] < held[:, None])[:, None, None, :]
        return DecoderCacheView(layers), masks


class EncoderBatch:
    """One batched encoder pass over new tokens of several slots (prompts or committed canvases).

    Passed to transformers' encoder layers as their `cache`: `update()` joins each row's held keys with
    the new ones for attention, and writes the new ones into the pool. Rows are laid out so that the
    new tokens of every row share one slice:

        key index t:  [ .. padding .. | held past of row i ][ new tokens (padded to the longest) ]
                      0          Hmax - h_i           Hmax                             Hmax + N

    so key t sits at position past_i + (t - Hmax) for every row, which makes the masks simple.
    """

    is_compileable = False

    def __init__(self, pool: KVPool, slots: list[int], new_lengths: list[int]):
        self.pool = pool
        self.slots = slots
        self.new_lengths = new_lengths
        self.past = [pool.total[s] for s in slots]
        self.width = max(new_lengths)
        device = pool.keys[0].device
        self.held = {kind: [pool.held_kind(s, kind) for s in slots] for kind in set(pool.layer_types)}
        self.masks: dict[str, torch.Tensor] = {}
        n = torch.tensor(new_lengths, device=device)[:, None, None]  # (B, 1, 1)
        j = torch.arange(self.width, device=device)[None, :, None]  # query (B, N, 1)
        for kind, held in self.held.items():
            hmax = max(held)
            t = torch.arange(hmax + self.width, device=device)[None, None, :]  # key (1, 1, K)
            rel = t - hmax  # key position relative to the first new token
            h = torch.tensor(held, device=device)[:, None, None]
            mask = (t >= hmax - h) & (rel <= j) & (rel < n)
            if kind == "sliding_attention":
                mask &= (j - rel) < pool.window
            mask |= (j >= n) & (t == hmax)  # padded queries attend somewhere harmless (their output is unused)
            self.masks[kind] = mask[:, None]  # (B, 1, N, K)

    def positions(self) -> torch.Tensor:
        device = self.pool.keys[0].device
        past = torch.tensor(self.past, device=device)[:, None]
        return past + torch.arange(self.width, device=device)[None, :]  # (B, N)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        pool = self.pool
        kind = pool.layer_types[layer_idx]
        held = self.held[kind]
        hmax = max(held)
        b, heads, _, dim = key_states.shape
        keys = key_states.new_zeros((b, heads, hmax + self.width, dim))
        values = value_states.new_zeros((b, heads, hmax + self.width, dim))
        keys[:, :, hmax:] = key_states
        values[:, :, hmax:] = value_states
        for i, slot in enumerate(self.slots):
            h, n = held[i], self.new_lengths[i]
            if h:
                keys[i, :, hmax - h : hmax] = pool.keys[layer_idx][slot, :, :h]
                values[i, :, hmax - h : hmax] = pool.values[layer_idx][slot, :, :h]
            if pool.sliding[layer_idx]:  # keep the last window - 1 positions of past + new
                keep = min(h + n, pool.window - 1)
                pool.keys[layer_idx][slot, :, :keep] = keys[i, :, hmax + n - keep : hmax + n]
                pool.values[layer_idx][slot, :, :keep] = values[i, :, hmax + n - keep : hmax + n]
            else:
                past = self.past[i]
                pool.keys[layer_idx][slot, :, past : past + n] = key_states[i, :, :n]
                pool.values[layer_idx][slot, :, past : past + n] = value_states[i, :, :n]
        return keys, values

    def commit(self) -> None:
        """After the forward: the slots now hold their new tokens."""
        for slot, past, n in zip(self.slots, self.past, self.new_lengths, strict=True):
            self.pool.total[slot] = past + n


class StaticEncoderCache:
    """The `cache` of a fixed-shape encoder pass (graphs.StaticEncode): the same contract as `EncoderBatch`,
    with every shape fixed by the bucket and every per-row offset in the step's index buffers, so the pass can
    be captured as a CUDA graph.

    Attention sees, per row, the slot's whole capacity (past keys left-aligned, masked beyond what it holds)
    followed by the L new keys. The pool then gets the new keys: after the past on full layers (a scatter), as
    the last `window - 1` positions of past + new on sliding layers (a gather).
    """

    is_compileable = False

    def __init__(self, pool: KVPool, step):
        self.pool, self.step = pool, step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        pool, step = self.pool, self.step
        out = []
        for store, new in ((pool.keys[layer_idx], key_states), (pool.values[layer_idx], value_states)):
            past = store.index_select(0, step.slots)  # (bucket, heads, capacity, dim)
            joined = torch.cat([past, new.to(past.dtype)], dim=2)
            b, heads, cap, dim = past.shape
            if pool.sliding[layer_idx]:
                index = step.gather[:, None, :, None].expand(b, heads, cap, dim)
                store.index_copy_(0, step.slots, joined.gather(2, index))
            else:
                index = step.scatter[:, None, :, None].expand(b, heads, new.shape[2], dim)
                store.index_copy_(0, step.slots, past.scatter(2, index, new.to(past.dtype)))
            out.append(joined)
        return out[0], out[1]
