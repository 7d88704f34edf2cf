"""The training loop for both tasks (sudoku, text).

    AdamW (fused on CUDA), linear warmup + cosine decay over max(step / max_steps, elapsed / time budget),
    bf16 autocast and compiled layers on CUDA (fp32, eager on CPU), grad clipping, fixed seeds, a progress bar on
    a TTY (log lines otherwise), periodic evaluation, and a checkpoint written at every evaluation that improves
    the metric (so a run cut short still leaves its best checkpoint behind). The step itself is `run.train_step`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from training.checkpoints import save_checkpoint
from training.config import TrainConfig
from training.model import param_count
from training.run import Heartbeat, build_run, device_name, first_step, halve_batch, peak_flops, train_step
from training.tasks import Task

__all__ = ["TrainConfig", "train"]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None



def lr_at(step: int, progress: float, base: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from `base` to `base * min_ratio` over progress 0..1."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, max(0.0, progress))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))



class Progress:
    """tqdm on a TTY, else a log line every `every` steps or 15 s."""

    def __init__(self, total_steps: int, total_seconds: float, every: int, log: Callable[[str], None]):
        self.log = log
        self.every = every
        self.bar = None
        self.last_line = 0.0
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps or None, unit="step", dynamic_ncols=True,
                                desc=f"train ({total_seconds:.0f}s budget)" if total_seconds else "train")
            except ImportError:
                self.bar = None

    def update(self, step: int, text: str, force: bool = False) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(text)
            return
        now = time.time()
        if force or step % self.every == 0 or now - self.last_line > 15:
            self.last_line = now
            self.log(f"step {step} | {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()



# ------------------------------------------------------------------------------------------------ train

def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train, evaluate, save. Returns the summary (also written to `<out>/dgserve.json`)."""
    run = build_run(cfg, log)
    cfg, device, task, model, save_dtype = run.cfg, run.device, run.task, run.model, run.save_dtype
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = peak_flops(device)

    # the last evaluation (on CUDA: two sampler sweeps, new shapes to compile, text samples) and the save must fit
    reserve = 2.0 if cfg.smoke else 20.0
    deadline = cfg.started + cfg.max_seconds - reserve if cfg.max_seconds else math.inf
    train_start = time.time()
    train_window = max(1e-6, deadline - train_start) if cfg.max_seconds else math.inf
    if cfg.max_seconds and train_window < 5:
        log(f"WARNING: only {train_window:.1f}s left for training after setup")

    history: list[dict] = []
    evals: list[dict] = []
    best: dict[str, Any] = {"metric": -math.inf}
    progress = Progress(cfg.max_steps, cfg.max_seconds, cfg.log_every, log)
    loss_sum = torch.zeros(3, device=device)  # loss, loss on redrawn positions, accuracy on redrawn positions
    loss_n = 0
    step = 0
    examples = 0
    last_eval = time.time()
    last_log_t, last_log_step = time.time(), 0
    last_loss = math.nan

    def checkpoint(result: dict, final: bool) -> None:
        metric = task.metric(result)
        record = {"step": step, "elapsed": round(time.time() - cfg.started, 1), **result}
        evals.append(record)
        short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()
                 if k not in ("samples", "sampler", "solve_rate_by_difficulty")}
        log(f"eval @ step {step}: {short}")
        if metric > best["metric"]:
            best.update(metric=metric, step=step, result=result)
            save(model, task, cfg, out, save_dtype, summary(final=final))

    def throughput() -> dict:
        """Examples/s over the last logged interval (after compilation), FLOP/s from the counted FLOPs."""
        rates = [h["examples_per_s"] for h in history[1:]] or [h["examples_per_s"] for h in history]
        rate = rates[-1] if rates else None
        fpe = run.flops_per_example
        tflops = round(rate * fpe / 1e12, 2) if rate and fpe else None
        return {"examples_per_s": rate, "batch_size": cfg.batch_size, "flops_per_example": fpe, "tflops": tflops,
                "card_share": round(tflops * 1e12 / peak, 4) if tflops and peak else None,
                "card_peak_bf16_tflops": peak / 1e12 if peak else None, "compiled": bool(cfg.compile),
                "compile_seconds": run.compile_seconds, "bf16_autocast": run.bf16}

    def summary(final: bool) -> dict:
        now = time.time()
        return {
            "kind": task.name, "trained": True, "final": final, "seed": cfg.seed, "steps": step,
            "examples": examples, "loss": last_loss, "train_seconds": round(now - train_start, 1),
            "wall_seconds": round(now - cfg.started, 1), "device": device_name(device),
            "params": param_count(model), "dtype_saved": str(save_dtype).removeprefix("torch."),
            "eval": best.get("result"), "eval_step": best.get("step"),
            "history": history, "evals": [{k: v for k, v in e.items() if k != "samples"} for e in evals],
            "config": {k: v for k, v in asdict(cfg).items() if k != "started"}, "init_from": run.init_from,
            "throughput": throughput(),
            "model_config": build_config_summary(model),
            "versions": {"torch": torch.__version__, "transformers": _transformers_version(),
                         "python": platform.python_version(), "git": git_commit()},
            **task.metadata(),
        }

    if cfg.init:  # a continued run measures where it starts: what it saves is never worse than that
        note = " (and compiling the no-grad graphs)" if cfg.compile else ""
        with Heartbeat(f"{task.name}: evaluating the starting point{note}", log):
            start_eval = task.evaluate(model, final=False)
        checkpoint(start_eval, final=False)
        last_eval = time.time()

    while True:
        if cfg.max_steps and step >= cfg.max_steps:
            break
        now = time.time()
        if now >= deadline:
            break
        progress_frac = max(step / cfg.max_steps if cfg.max_steps else 0.0,
                            (now - train_start) / train_window if cfg.max_seconds else 0.0)
        lr = lr_at(step, progress_frac, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        try:
            batch = task.batch(step)
            out_step = train_step(run, batch, lr) if step else first_step(run, batch, lr, log)
        except torch.OutOfMemoryError:
            batch = out_step = None
            if not halve_batch(run, log, f" at step {step}"):
                raise
            continue
        loss_sum += torch.stack([out_step.loss.detach(), out_step.noised_loss, out_step.noised_acc.float()])
        loss_n += 1
        step += 1
        examples += cfg.batch_size

        log_now = step % cfg.log_every == 0 or step == 1 or (cfg.max_steps and step == cfg.max_steps)
        if log_now or progress.bar is not None and step % 10 == 0:
            t = time.time()
            if log_now:
                means = (loss_sum / loss_n).tolist()  # the only host sync of the loop
                last_loss = means[0]
                loss_sum.zero_()
                loss_n = 0
                rate = (step - last_log_step) / max(1e-9, t - last_log_t)
                history.append({"step": step, "t": round(t - cfg.started, 1), "loss": round(last_loss, 5),
                                "noised_loss": round(means[1], 5), "noised_acc": round(means[2], 4),
                                "lr": lr, "steps_per_s": round(rate, 2),
                                "examples_per_s": round(rate * cfg.batch_size, 1)})
                last_log_t, last_log_step = t, step
                progress.update(step, f"loss {last_loss:.4f} (redrawn: {means[1]:.3f}, acc {means[2]:.3f}) "
                                      f"lr {lr:.2e} {rate:.1f} it/s "
                                      f"{rate * cfg.batch_size:.0f} ex/s t={t - cfg.started:.0f}s", force=True)
            else:
                progress.update(step, f"loss {last_loss:.4f} lr {lr:.2e}")

        if (cfg.eval_every_steps and step % cfg.eval_every_steps == 0) or \
                (time.time() - last_eval > cfg.eval_every_seconds and time.time() < deadline - 5):
            checkpoint(task.evaluate(model, final=False), final=False)
            last_eval = time.time()

    progress.close()
    if loss_n:
        last_loss = float(loss_sum[0] / loss_n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_time = time.time() - train_start
    tp = throughput()
    log(f"{task.name}: {step} steps in {train_time:.1f}s ({step / max(1e-9, train_time):.2f} steps/s, "
        f"{examples / max(1e-9, train_time):.0f} examples/s overall, {tp.get('examples_per_s')} at the end; "
        f"{tp.get('tflops')} TFLOP/s, card share {tp.get('card_share')}), last loss {last_loss:.4f}")
    final_result = task.evaluate(model, final=True)
    checkpoint(final_result, final=True)
    result = summary(final=True)
    result["final_eval"] = final_result
    result["saved_step"] = best.get("step")
    # the checkpoint on disk is the best one; record how the final model did as well
    meta_path = out / "dgserve.json"
    saved = json.loads(meta_path.read_text())
    saved["final_eval"] = {k: v for k, v in final_result.items()}
    saved["run"] = {"steps": step, "train_seconds": round(train_time, 1),
                    "wall_seconds": round(time.time() - cfg.started, 1), "last_loss": last_loss}
    meta_path.write_text(json.dumps(saved, indent=1, sort_keys=True, default=str) + "\n")
    result["checkpoint"] = str(out)
    result["checkpoint_bytes"] = (out / "model.safetensors").stat().st_size
    return result


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def build_config_summary(model) -> dict:
    t = model.config.get_text_config().to_dict()
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "intermediate_size",
            "moe_intermediate_size", "num_experts", "top_k_experts", "sliding_window", "layer_types")
    return {k: t.get(k) for k in keys} | {"canvas_length": model.config.canvas_length}


def save(model, task: Task, cfg: TrainConfig, out: Path, dtype: torch.dtype, extra: dict) -> None:
    """Write the checkpoint (atomically enough: a temp dir renamed over the old one)."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        _rmtree(tmp)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    to_save = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    was_training = to_save.training
    to_save.eval()
    save_checkpoint(to_save, task.tokenizer, tmp, extra=json.loads(json.dumps(extra, default=str)))
    to_save.train(was_training)
    size = (tmp / "model.safetensors").stat().st_size
    if size >= 15_000_000:
        raise RuntimeError(f"model.safetensors is {size} bytes, over the 15 MB limit")
    for f in tmp.iterdir():  # replace file by file: `out` may hold other things (e.g. logs)
        os.replace(f, out / f.name)
    tmp.rmdir()


def _rmtree(path: Path) -> None:
    for f in path.iterdir():
        f.unlink()
    path.rmdir()
