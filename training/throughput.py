"""Training throughput of the real step (`run.train_step`: data on the device, objective, backward, clip, AdamW):
examples/s, FLOPs per example (counted by torch), the share of the card's bf16 peak that would be. Timing is
what a benchmark does: warm-up steps first (compilation included there), then timed steps, a device sync at each
end, nothing else in between.

    python -m training throughput --task sudoku --device cpu --batch-size 16 --steps 10 --out bench/results/x.json
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from training.config import TrainConfig
from training.run import build_run, device_name, first_step, halve_batch, peak_flops, train_step

GOAL_EXAMPLES_PER_S = 40_000  # the sudoku model on one H200 (issue 17)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_step_that_fits(run, lr: float, log) -> None:
    """The first step (compilation), halving the batch while it runs out of memory, as training does."""
    while True:
        try:
            first_step(run, run.task.batch(0), lr, log)
            return
        except torch.OutOfMemoryError:
            if not halve_batch(run, log):
                raise


def measure(cfg: TrainConfig, steps: int, warmup: int, log=print) -> dict:
    run = build_run(cfg, log)
    device, lr = run.device, run.cfg.lr
    started = time.time()
    _first_step_that_fits(run, lr, log)
    for k in range(1, warmup):
        train_step(run, run.task.batch(k), lr)
    _sync(device)
    warm_s = time.time() - started
    t = time.time()
    for k in range(steps):
        out = train_step(run, run.task.batch(warmup + k), lr)
    _sync(device)
    seconds = time.time() - t
    rate = steps * run.cfg.batch_size / seconds
    fpe = run.flops_per_example
    peak = peak_flops(device)
    return {
        "task": run.task.name, "preset": run.cfg.preset, "device": device_name(device),
        "batch_size": run.cfg.batch_size,
        "compiled": bool(run.cfg.compile), "bf16_autocast": run.bf16,
        "threads": torch.get_num_threads(), "load_average_1m": round(os.getloadavg()[0], 2),
        "warmup_steps": warmup, "warmup_seconds": round(warm_s, 2), "compile_seconds": run.compile_seconds,
        "timed_steps": steps, "seconds": round(seconds, 3), "examples_per_s": round(rate, 2),
        "flops_per_example": fpe, "achieved_tflops": round(rate * fpe / 1e12, 4) if fpe else None,
        "card_peak_bf16_tflops": peak / 1e12 if peak else None,
        "loss": float(out.loss.detach()), "torch": torch.__version__,
    }


def goal_share(flops_per_example: float, peak: float = 989e12) -> dict:
    """What the 40,000 examples/s goal means for the card: FLOP/s and the share of the H200's bf16 peak."""
    need = GOAL_EXAMPLES_PER_S * flops_per_example
    return {"goal_examples_per_s": GOAL_EXAMPLES_PER_S, "goal_tflops": round(need / 1e12, 1),
            "goal_share_of_h200_bf16_peak": round(need / peak, 3)}


def main(args) -> int:
    cfg = TrainConfig(task=args.task, out=args.scratch, device=args.device, batch_size=args.batch_size,
                      compile=args.compile, threads=args.threads, preset=args.preset, safe=args.safe,
                      canvas_length=args.canvas_length or 64, init=args.init)
    result = measure(cfg, args.steps, args.warmup, log=lambda m: print(f"[throughput] {m}", flush=True))
    if result["flops_per_example"] and result["task"] == "sudoku":
        result.update(goal_share(result["flops_per_example"]))
    print(json.dumps(result), flush=True)
    if args.out:
        path = Path(args.out)
        report = json.loads(path.read_text()) if path.exists() else {"benchmark": "training-throughput", "runs": []}
        report["runs"].append(result)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
    return 0
