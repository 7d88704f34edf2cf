"""The preallocated key/value pool: one slot per request, written and read in place by the fused ops.

Each request owns a slot; active requests occupy slots 0..n-1 (a decoder step reads rows 0..n-1 with slot b = row
b), and one spare slot past them takes the padding rows of fixed-shape encoder passes. Per layer the pool is
(slots, kv_heads, capacity, head_dim):

    full-attention layers     every encoded token at its position, then room for the canvas:
                              capacity = max_context
    sliding-window layers     the last `window - 1` encoded tokens (what transformers' sliding cache keeps, and so
                              what the reference decoder sees), then the canvas:
                              capacity = min(window - 1, max_context) + canvas

A pass over a block of new tokens (a canvas being denoised, a committed canvas or a prompt chunk being encoded)
writes their keys and values right after what the slot holds, at `start`, and attends over `start + block` keys;
only encoder passes make them part of what the slot holds (`commit`), after which sliding layers keep their last
`window - 1` positions (`compact`).
"""

from __future__ import annotations

import torch

from worker.transfer import to_device


class KVPool:
    def __init__(self, text_config, rows: int, max_context: int, canvas_length: int, device, dtype: torch.dtype):
        self.rows = rows
        self.spare_slot = rows  # padding rows of fixed-shape encoder passes write here
        self.max_context = max_context
        self.canvas_length = canvas_length
        self.window = text_config.sliding_window
        self.layer_types: list[str] = list(text_config.layer_types)[: text_config.num_hidden_layers]
        self.kinds = sorted(set(self.layer_types))
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for i, kind in enumerate(self.layer_types):
            layer_cfg = text_config.per_layer_config[i]
            shape = (rows + 1, layer_cfg.num_key_value_heads, self.capacity(kind), layer_cfg.head_dim)
            self.keys.append(torch.zeros(shape, device=device, dtype=dtype))
            self.values.append(torch.zeros(shape, device=device, dtype=dtype))
        self.total = [0] * (rows + 1)  # tokens encoded into each slot

    def capacity(self, kind: str) -> int:
        if kind == "sliding_attention":
            return min(self.window - 1, self.max_context) + self.canvas_length
        return self.max_context

    @property
    def bytes_per_row(self) -> int:
        return sum(k[0].numel() * k.element_size() * 2 for k in self.keys)

    def held(self, slot: int, kind: str) -> int:
        """Positions that layers of `kind` hold for `slot`: where a new block's keys start."""
        total = self.total[slot]
        return min(total, self.window - 1) if kind == "sliding_attention" else total

    def move(self, src: int, dst: int) -> None:
        """Move a slot's contents (active slots stay contiguous)."""
        if src == dst:
            return
        for store in (self.keys, self.values):
            for i, kind in enumerate(self.layer_types):
                n = self.held(src, kind)
                store[i][dst, :, :n] = store[i][src, :, :n]
        self.total[dst] = self.total[src]
        self.total[src] = 0

    def release(self, slot: int) -> None:
        self.total[slot] = 0

    def commit(self, slots: list[int], new: list[int]) -> None:
        """After an encoder pass wrote `new[i]` tokens for `slots[i]`: they are held now; sliding layers keep their
        last `window - 1` positions."""
        keep_from = []
        for slot, n in zip(slots, new, strict=True):
            held = self.held(slot, "sliding_attention")
            kept = min(held + n, self.window - 1)
            keep_from.append(held + n - kept)
            self.total[slot] += n
        if "sliding_attention" in self.kinds and any(keep_from):
            self._compact(slots, keep_from)

    def _compact(self, slots: list[int], shift: list[int]) -> None:
        """Sliding layers: row `slots[i]` keeps positions shift[i] .. shift[i] + window - 2, moved to the front."""
        device = self.keys[0].device
        cap = self.window - 1
        staged = to_device([shift, slots], torch.long, device)
        index = staged[0][:, None] + torch.arange(cap, device=device)[None, :]
        index = index.clamp(max=self.capacity("sliding_attention") - 1)  # (n, cap): rows past what is held: unused
        slot_index = staged[1]
        for store in (self.keys, self.values):
            for i, kind in enumerate(self.layer_types):
                if kind != "sliding_attention":
                    continue
                rows = store[i].index_select(0, slot_index)  # (n, heads, capacity, D)
                gather = index[:, None, :, None].expand(-1, rows.shape[1], -1, rows.shape[3])
                rows[:, :, :cap] = rows.gather(2, gather)
                store[i].index_copy_(0, slot_index, rows)
