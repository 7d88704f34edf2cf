"""Fixed shapes for the hot loop: batch-size buckets, and capturing a pass over a bucket as a CUDA graph.

A batch of n rows runs in the smallest bucket >= n; padding rows do harmless work on their own and their output is
dropped. On a GPU each bucket's passes are captured once at start-up and replayed every step (no kernel launch
overhead, no recompilation); on a CPU the same fixed-shape passes run eagerly, which is how the tests check them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def buckets_for(max_batch: int, sizes: tuple[int, ...] = DEFAULT_BUCKETS) -> list[int]:
    out = [b for b in sizes if b < max_batch] + [max_batch]
    return sorted(set(out))


def capture(run: Callable[[], torch.Tensor | None], mempool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None, float]:
    """Warm `run` up on a side stream, then capture it. Returns the graph, its output and the seconds it took."""
    started = time.perf_counter()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=mempool):
        output = run()
    torch.cuda.synchronize()
    return graph, output, time.perf_counter() - started
