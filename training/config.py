"""What one training run is told (`TrainConfig`) and the per-device defaults filled in before it starts."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch


@dataclass
class TrainConfig:
    task: str  # "sudoku" | "text"
    out: str
    preset: str = ""  # defaults to the task's preset ("smoke" with --smoke)
    arch: dict = field(default_factory=dict)  # text-config overrides on top of the preset
    device: str = "auto"
    seed: int = 0
    batch_size: int = 0  # 0: per device default (thousands on a big GPU)
    lr: float = 0.0  # 0: per device default
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0  # 0: default
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    max_steps: int = 0  # 0: no step limit (use max_seconds)
    max_seconds: float = 0.0  # 0: no time limit; wall time from `started` (setup included)
    eval_every_seconds: float = 0.0  # 0: default
    eval_every_steps: int = 0  # 0: time-based only
    log_every: int = 50
    sc_prob: float = 0.5
    init: str | None = None  # start from this checkpoint's weights (same architecture) instead of random ones
    compile: bool | None = None  # None: on CUDA (regional torch.compile of the layers), off elsewhere
    safe: bool = False  # transformers' own code paths only: no dense experts / fused norm / autocast / fused AdamW
    threads: int = 0
    smoke: bool = False
    # sudoku
    bank: str | None = None  # None: training/data/sudoku_bank.npz
    reveal_prob: float = 0.1  # share of puzzles made easier by revealing extra givens
    eval_puzzles: int = 0  # 0: all bundled qqwing puzzles
    sampler_steps: int = 32
    # text
    corpus: str | None = None
    vocab_size: int = 2048
    canvas_length: int = 64
    prompt_lengths: tuple[int, ...] = (8, 16, 32, 64, 96, 160)
    val_fraction: float = 0.02
    chat_fraction: float = 0.2
    started: float = field(default_factory=time.time)


def apply_defaults(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    cfg = copy.deepcopy(cfg)
    cuda = device.type == "cuda"
    if not cfg.preset:
        cfg.preset = "smoke" if cfg.smoke else cfg.task
    if not cfg.batch_size:
        if cfg.smoke:
            cfg.batch_size = 8
        elif cfg.task == "sudoku":
            cfg.batch_size = 4096 if cuda else 32
        else:
            cfg.batch_size = 512 if cuda else 16
    if not cfg.lr:  # a continued checkpoint starts at half the peak: it is trained already
        cfg.lr = (1e-3 if cfg.init else 2e-3) if cuda else 1e-3
    if not cfg.warmup_steps:
        cfg.warmup_steps = 5 if cfg.smoke else (150 if cuda else 20)
    if cfg.compile is None:
        cfg.compile = cuda and not cfg.safe
    if not cfg.eval_every_seconds:
        cfg.eval_every_seconds = 30.0 if cuda else 120.0
    if cfg.smoke:
        cfg.max_steps = cfg.max_steps or 6
        cfg.prompt_lengths = (8, 16)
        cfg.canvas_length = min(cfg.canvas_length, 16)
    return cfg
