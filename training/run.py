"""One training run's parts and its step, shared by `train` and the `throughput` measurement.

The step is: a batch drawn on the device (no host round trip), the objective under bf16 autocast on CUDA, backward,
gradient clipping (foreach, no sync), fused AdamW. On CUDA every transformer layer runs as two `torch.compile`d
functions shared by all layers (`training/split_layers.py`: projections, norms, RoPE; output projection, MLP, MoE,
residuals) around the eager KV-cache access and attention kernel, so start-up stays bounded whatever the depth;
it is shown with a heartbeat and paid once per process. If compilation fails the run says so and goes on eagerly.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from protocol import contract
from training.config import TrainConfig, apply_defaults
from training.evaluate import SamplerSettings
from training.model import (
    StepOutput,
    build_config,
    build_model,
    diffusion_loss,
    param_bytes,
    param_count,
    storage_dtype,
    unique_parameters,
)
from training.split_layers import compile_split_layers, use_split_layers
from training.tasks import SudokuTask, Task, TextTask
from worker.device import device_name, resolve_device

# dense bf16 tensor-core peaks (FLOP/s) of the cards we may be lent, for the share of the card a run uses
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "RTX 5090": 209e12}


def training_device(name: str) -> torch.device:
    """The worker's device rule, refusing a GPU that is not there before anything is built."""
    device = resolve_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    return device


def peak_flops(device: torch.device) -> float | None:
    name = device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None) if device.type == "cuda" else None


def make_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in unique_parameters(model):
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=cfg.betas, eps=1e-8)
    if device.type == "cuda" and not cfg.safe:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


# ------------------------------------------------------------------------------------------- compilation

class Heartbeat:
    """While the body runs, log `what` with the seconds elapsed every `every` seconds (compilation progress)."""

    def __init__(self, what: str, log: Callable[[str], None], every: float = 10.0):
        self.what, self.log, self.every = what, log, every
        self.stop = threading.Event()
        self.started = self.seconds = 0.0

    def _beat(self) -> None:
        while not self.stop.wait(self.every):
            self.log(f"{self.what}: {time.time() - self.started:.0f}s so far")

    def __enter__(self) -> Heartbeat:
        self.started = time.time()
        self.log(f"{self.what} ...")
        threading.Thread(target=self._beat, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.seconds = time.time() - self.started


# ------------------------------------------------------------------------------------------------- a run

@dataclass
class Run:
    cfg: TrainConfig
    device: torch.device
    task: Task
    model: Any
    opt: torch.optim.AdamW
    bf16: bool  # bf16 autocast: on CUDA unless --safe
    loss_gen: torch.Generator
    save_dtype: torch.dtype
    init_from: dict | None
    flops_per_example: float | None = None
    compile_seconds: float | None = None

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()


def init_weights(model, task: Task, cfg: TrainConfig, log) -> dict:
    """Continue a saved checkpoint: its weights (and, for sudoku, the sampling it was tuned to)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    source = DiffusionGemmaForBlockDiffusion.from_pretrained(cfg.init, dtype=torch.float32)
    model.load_state_dict(source.state_dict())
    meta = Path(cfg.init) / "dgserve.json"
    previous = json.loads(meta.read_text()) if meta.exists() else {}
    init_from = {"path": str(cfg.init), "steps": previous.get("steps"), "seed": previous.get("seed"),
                 "device": previous.get("device"), "git": previous.get("versions", {}).get("git")}
    log(f"{task.name}: initialised from {cfg.init} (trained {init_from['steps']} steps before)")
    if isinstance(task, SudokuTask) and not cfg.smoke:
        defaults = contract.sampling_defaults(source.generation_config)
        task.settings = SamplerSettings(**{f.name: defaults[f.name] for f in dataclasses.fields(SamplerSettings)})
    return init_from


def build_run(cfg: TrainConfig, log: Callable[[str], None]) -> Run:
    device = training_device(cfg.device)
    cfg = apply_defaults(cfg, device)
    if cfg.compile and cfg.safe:  # before minutes of data and model building, not after
        raise SystemExit("--compile needs the fast layers: drop --safe")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    task: Task = SudokuTask(cfg, device, log) if cfg.task == "sudoku" else TextTask(cfg, device, log)
    config = build_config(cfg.preset, task.vocab_size, task.canvas_length, **cfg.arch)
    model = build_model(config, cfg.seed, fast=not cfg.safe).to(device)
    init_from = init_weights(model, task, cfg, log) if cfg.init else None
    model.train()
    model.generation_config = task.generation_config()
    save_dtype = storage_dtype(model)
    log(f"{task.name}: preset {cfg.preset}, {param_count(model) / 1e6:.2f}M parameters "
        f"({param_bytes(model, save_dtype) / 1e6:.1f} MB as {str(save_dtype).removeprefix('torch.')}), "
        f"device {device_name(device)}, batch {cfg.batch_size}, lr {cfg.lr}, "
        f"{'compiled layers' if cfg.compile else 'eager'}" + (" [safe mode]" if cfg.safe else ""))
    loss_gen = torch.Generator(device=device)
    loss_gen.manual_seed(cfg.seed + 11)
    bf16 = device.type == "cuda" and not cfg.safe
    run = Run(cfg, device, task, model, make_optimizer(model, cfg, device), bf16, loss_gen, save_dtype, init_from)
    if isinstance(task, TextTask):
        task.autocast = run.autocast
    run.flops_per_example = count_flops_per_example(run)
    if cfg.compile:
        compile_split_layers(model)
    return run


def forward_backward(run: Run, batch: dict) -> StepOutput:
    with run.autocast():
        out = diffusion_loss(run.model, batch["prompt"], batch["clean"], run.loss_gen, fixed=batch.get("fixed"),
                             sc_prob=run.cfg.sc_prob)
    out.loss.backward()
    return out


def train_step(run: Run, batch: dict, lr: float) -> StepOutput:
    """One optimizer step on `batch`; no host sync."""
    for group in run.opt.param_groups:
        group["lr"] = lr
    out = forward_backward(run, batch)
    if run.cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(unique_parameters(run.model), run.cfg.grad_clip, foreach=True)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return out


def first_step(run: Run, batch: dict, lr: float, log: Callable[[str], None]) -> StepOutput:
    """The first step, where compilation happens: shown with a heartbeat; on a compile failure the layers go
    back to eager and the step is retried (the failed attempt changed no weight: it failed before the update)."""
    if not run.cfg.compile:
        return train_step(run, batch, lr)
    beat = Heartbeat(f"{run.task.name}: compiling the layers (first forward/backward, once per process)", log)
    try:
        with beat:
            out = train_step(run, batch, lr)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any compiler failure: train eagerly rather than not at all
        log(f"WARNING: compiling failed after {time.time() - beat.started:.0f}s ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); training eagerly")
        run.opt.zero_grad(set_to_none=True)
        use_split_layers(run.model)  # the plain (eager) halves again
        run.cfg.compile = False
        return train_step(run, batch, lr)
    run.compile_seconds = round(beat.seconds, 1)
    log(f"{run.task.name}: compiled and ran the first step in {run.compile_seconds}s")
    return out


def halve_batch(run: Run, log: Callable[[str], None], where: str = "") -> bool:
    """After a step ran out of memory: drop its gradients and the allocator's cached blocks, halve the batch size.
    False (nothing changed) when the batch is 16 or smaller already: the caller re-raises."""
    if run.cfg.batch_size <= 16:
        return False
    run.opt.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    run.cfg.batch_size //= 2
    log(f"WARNING: out of memory{where}; batch size halved to {run.cfg.batch_size}")
    return True


def count_flops_per_example(run: Run, n: int = 2) -> float | None:
    """FLOPs of one training example (forward, self-conditioning pass, backward) counted by torch's
    FlopCounterMode on `n` examples, eagerly, gradients thrown away. Matrix products and attention only."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        batch = run.task.batch(0, size=n)
        state = run.loss_gen.get_state()
        with FlopCounterMode(display=False) as counter:
            forward_backward(run, batch)
        run.loss_gen.set_state(state)
        run.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops() / n
    except Exception:  # noqa: BLE001 - a figure for the logs; never stop training over it
        run.opt.zero_grad(set_to_none=True)
        return None
