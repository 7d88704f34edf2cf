"""A preallocated key/value pool: one slot per request, shaped for batched decoder steps.

Each request owns a slot. Full-attention layers keep every encoded token; sliding-window layers keep
only the last `sliding_window - 1` tokens, exactly what transformers' `DynamicSlidingWindowLayer`
keeps, so the decoder sees per row what the reference decoder sees. Active requests occupy slots
0..n-1, so a decoder step reads `pool[:n]` without gathering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache


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
    def __init__(self, text_config, rows: int, max_context: int, device, dtype: torch.dtype):
        self.text_config = text_config
        self.rows = rows
        self.max_context = max_context
        self.window = text_config.sliding_window
        self.layer_types: list[str] = list(text_config.layer_types)
        self.sliding = [t == "sliding_attention" for t in self.layer_types]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for i, sliding in enumerate(self.sliding):
            layer_cfg = text_config.per_layer_config[i]
            cap = min(self.window - 1, max_context) if sliding else max_context
            shape = (rows, layer_cfg.num_key_value_heads, cap, layer_cfg.head_dim)
            self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
            self.values.append(torch.zeros(shape, device=device, dtype=dtype))
        self.total = [0] * rows  # tokens encoded into each slot

    @property
    def bytes_per_row(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.keys) // self.rows

    def held(self, slot: int, layer: int) -> int:
        """How many positions of `layer` hold data for `slot`."""
        total = self.total[slot]
        return min(total, self.window - 1) if self.sliding[layer] else total

    def encoder_cache(self, slot: int) -> DynamicCache:
        """A batch-1 DynamicCache whose layers start as views of this slot (for the encoder to extend)."""
        cache = DynamicCache(config=self.text_config)
        if self.total[slot] == 0:
            return cache
        for i, layer in enumerate(cache.layers):
            n = self.held(slot, i)
            k = self.keys[i][slot : slot + 1, :, :n]
            v = self.values[i][slot : slot + 1, :, :n]
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
            if self.sliding[i]:
                layer.cumulative_length = self.total[slot]
        return cache

    def store(self, slot: int, cache: DynamicCache, total: int) -> None:
        """Write the encoder's extended cache back into the slot."""
        if total > self.max_context:
            raise ValueError(f"context {total} exceeds the pool's max_context {self.max_context}")
        old = self.total[slot]
        self.total[slot] = total
        for i, layer in enumerate(cache.layers):
            n = self.held(slot, i)
            k, v = layer.keys[0], layer.values[0]  # (H, len, D)
            if self.sliding[i]:
                # the window moved: rewrite what it holds now (at most window - 1 positions)
                self.keys[i][slot, :, :n] = k[:, -n:]
                self.values[i][slot, :, :n] = v[:, -n:]
            else:
                self.keys[i][slot, :, old:total] = k[:, old:total]
                self.values[i][slot, :, old:total] = v[:, old:total]

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
