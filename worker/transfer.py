"""Host <-> device copies of the hot loop, without stalling the GPU queue.

A copy from pageable host memory synchronises the stream first; from pinned memory it is queued like a kernel.
So per-step inputs go up staged in pinned memory, and a step's results come down in one batch of non-blocking
copies followed by one wait.
"""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values as a device tensor without a host sync: staged in pinned memory, copied non-blocking."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> list[list]:
    """Device tensors as Python lists, with one wait: non-blocking copies into pinned buffers, then one sync."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.tolist() for t in tensors]
    pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for dst, src in zip(pinned, tensors, strict=True):
        dst.copy_(src, non_blocking=True)
    torch.cuda.current_stream().synchronize()
    return [t.tolist() for t in pinned]
