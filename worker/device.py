"""Which device a process runs on, and the name results give it."""

from __future__ import annotations

import os
import platform

import torch


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; anything else as torch names it (cpu, cuda, cuda:N)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device | str) -> str:
    """The card's name, or the CPU's architecture, cores and torch threads (what a benchmark ran on)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
