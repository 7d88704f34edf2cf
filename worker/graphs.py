"""Fixed-shape decoder steps and committed-canvas encoder passes, captured once as CUDA graphs.

The batched decoder forward is the hot loop. For a few batch sizes ("buckets") we keep static input
buffers shaped (bucket, canvas) and attend over the pool's whole capacity with a mask, so the shapes
never change; on a GPU each bucket is captured once at start-up and replayed every step (no kernel
launch overhead, no recompilation). A batch of n rows runs in the smallest bucket >= n; the padding
rows see only their own canvas and their output is dropped.

On a CPU the same static path runs eagerly (`graphs=False`): that is how the tests check that the
padded, full-capacity step computes exactly what the eager one does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def buckets_for(max_batch: int, sizes: tuple[int, ...] = DEFAULT_BUCKETS) -> list[int]:
    out = [b for b in sizes if b < max_batch] + [max_batch]
    return sorted(set(out))


class _Captured:
    """Static buffers of one bucket, and (on CUDA) the captured graph of a forward over them."""

    bucket: int
    graph: torch.cuda.CUDAGraph | None = None
    output: torch.Tensor | None = None

    def capture(self, forward: Callable, pool) -> float:
        """Warm up on a side stream, then capture. Returns the seconds it took."""
        started = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward(self)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = forward(self)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    def run(self, forward: Callable) -> torch.Tensor | None:
        if self.graph is not None:
            self.graph.replay()
            return self.output
        return forward(self)


class StaticStep(_Captured):
    """One bucket of the batched decoder step."""

    def __init__(self, bucket: int, canvas_length: int, hidden: int, mask_widths: dict[str, int],
                 device: torch.device, dtype: torch.dtype, mask_dtype: torch.dtype):
        self.bucket = bucket
        L = canvas_length
        self.canvas = torch.zeros((bucket, L), dtype=torch.long, device=device)
        self.soft = torch.zeros((bucket, L, hidden), dtype=dtype, device=device)
        self.positions = torch.zeros((bucket, L), dtype=torch.long, device=device)
        # one mask per layer type over (cache capacity + canvas); True (or 0.0): attend
        self.masks = {kind: torch.zeros((bucket, 1, L, width + L), dtype=mask_dtype, device=device)
                      for kind, width in mask_widths.items()}


class StaticEncode(_Captured):
    """One bucket of the encoder pass over committed canvases (L new tokens per row, after what each row holds).

    Rows are gathered from their pool slots by index, so they need not be contiguous; padding rows point at
    the pool's spare slot. Per layer type: the mask over (capacity + L) keys, and where the new keys go: full
    layers scatter the L keys after the row's past (`scatter`), sliding layers rebuild the window from
    (past + new) with one gather (`gather`).
    """

    def __init__(self, bucket: int, canvas_length: int, mask_widths: dict[str, int], spare_slot: int,
                 device: torch.device, mask_dtype: torch.dtype):
        self.bucket = bucket
        L = canvas_length
        self.ids = torch.zeros((bucket, L), dtype=torch.long, device=device)
        self.positions = torch.zeros((bucket, L), dtype=torch.long, device=device)
        self.slots = torch.full((bucket,), spare_slot, dtype=torch.long, device=device)
        self.masks = {kind: torch.zeros((bucket, 1, L, width + L), dtype=mask_dtype, device=device)
                      for kind, width in mask_widths.items()}
        self.scatter = torch.arange(L, device=device).repeat(bucket, 1)  # (bucket, L) positions of the new keys
        width = mask_widths.get("sliding_attention", 0)
        self.gather = torch.zeros((bucket, width), dtype=torch.long, device=device)  # (bucket, window capacity)
