"""bench/kernels.py (the kernel microbenchmark, GPU only) checked for its plumbing on the CPU: its --smoke mode builds
every case at tiny shapes and runs both implementations of each op under the interpreter once (no timing claims)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/kernels.py", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)


def test_every_registered_op_is_benchmarked_and_both_implementations_agree(tmp_path):
    from worker.ops.triton_kernels import TRITON_OPS

    out = tmp_path / "kernels.json"
    done = run_bench("--smoke", "--rows", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    ops = {r["case"].split()[0] for r in report["results"]}
    assert ops == {op for names in TRITON_OPS.values() for op in names}, ops
    for r in report["results"]:
        assert r["triton_us"] > 0 and r["torch_us"] > 0, r
        # bf16 outputs of the same inputs: a few ulps of values of order 1-10 (integer outputs: no entry differs)
        assert r["max_abs_diff"] <= 0.125, r
    assert {r["case"] for r in report["results"]} >= {"attention sliding decoder", "attention global encoder"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU answer")
def test_without_a_gpu_it_says_so_and_exits_0():
    done = run_bench()
    assert done.returncode == 0 and "no CUDA device" in done.stdout, (done.stdout, done.stderr)
