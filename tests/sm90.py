"""Compiling Triton kernels for an H100/H200 (sm90) on a machine without a GPU, to check what the compiled kernels
use (shared memory, registers, spills, wgmma). Needs TRITON_INTERPRET=0 before triton is imported: run it in a
subprocess from tests that otherwise use the interpreter."""

from __future__ import annotations

import re
import subprocess
import tempfile

import torch

SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm90 (227 KB of an H100/H200 SM's 228)


class Sm90Target:
    """What Triton's JIT asks of a driver to compile (nothing is launched)."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def use_sm90_target() -> None:
    """From here on, `kernel.warmup(...)` compiles for sm90."""
    from triton.runtime import driver

    driver.set_active(Sm90Target())


def usage(compiled) -> dict:
    """shared (bytes a block), registers and stack (bytes a thread: spills) of a compiled kernel, and whether its
    dots became wgmma."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    return {
        "shared": compiled.metadata.shared,
        "registers": int(re.search(r"REG:(\d+)", dump).group(1)),
        "stack": int(re.search(r"STACK:(\d+)", dump).group(1)),
        "wgmma": "ttng.warp_group_dot" in compiled.asm["ttgir"],
    }
