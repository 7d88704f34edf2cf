"""Compiling Triton kernels for an H100/H200 (sm90) on a machine without a GPU, to check what the compiled kernels
use (shared memory, registers, spills, wgmma, pipelined loads). Needs TRITON_INTERPRET=0 before triton is imported:
run it in a subprocess from tests that otherwise use the interpreter.

Two ways in: `kernel.warmup(*args, grid=..., **kwargs)` once `use_sm90_target()` is on, or `compiling()`, under
which the launchers themselves run on CPU tensors and each kernel launch compiles instead of running."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm90 (227 KB of an H100/H200 SM's 228)
ROOT = Path(__file__).resolve().parents[1]


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


@contextlib.contextmanager
def compiling() -> Iterator[list[dict]]:
    """Every kernel launch inside compiles for sm90 instead of running; yields the `usage` of each, in launch order
    (with the kernel's name and grid)."""
    from triton.runtime.jit import JITFunction

    use_sm90_target()
    run = JITFunction.run
    report: list[dict] = []

    def compile_only(self, *args, grid, warmup, **kwargs):
        compiled = run(self, *args, grid=grid, warmup=True, **kwargs)
        report.append({"kernel": self.__name__, "grid": list(grid), **usage(compiled)})
        return compiled

    JITFunction.run = compile_only
    try:
        yield report
    finally:
        JITFunction.run = run


def cuobjdump() -> str:
    """The cuobjdump that ships with Triton's NVIDIA backend."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return knobs.nvidia.cuobjdump.path
    return str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")


def usage(compiled) -> dict:
    """What a compiled kernel uses: shared (bytes a block), registers, stack and local (bytes a thread: spills);
    whether its dots became wgmma (fp8: e4m3 wgmma), its global loads 16-byte vectors; how many pipelined
    (cp.async) copies it has."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([cuobjdump(), "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    return {
        "shared": compiled.metadata.shared,
        "registers": int(re.search(r"REG:(\d+)", dump).group(1)),
        "stack": int(re.search(r"STACK:(\d+)", dump).group(1)),
        "local": int(re.search(r"LOCAL:(\d+)", dump).group(1)),
        "wgmma": "ttng.warp_group_dot" in ttgir,
        "fp8_wgmma": re.search(r"wgmma\.mma_async\S*\.e4m3", ptx) is not None,
        "async_loads": ttgir.count("async_copy_global_to_local"),
        "vector_loads": "ld.global.v4" in ptx,
        "cubin": len(compiled.asm["cubin"]),
    }


def report_of(module: str, function: str, *args: str, timeout: float = 900) -> object:
    """Run `module.function(*args)` in a subprocess with the interpreter off and return the JSON it returns."""
    code = f"import json, sys; from {module} import {function} as f; print(json.dumps(f(*sys.argv[1:])))"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
