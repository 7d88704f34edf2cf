"""The training loop for both tasks (sudoku, text).

    AdamW (fused on CUDA), linear warmup + cosine decay over max(step / max_steps, elapsed / time budget),
    bf16 autocast on CUDA (fp32 on CPU), grad clipping, fixed seeds, a progress bar on a TTY (log lines
    otherwise), periodic evaluation, and a checkpoint written at every evaluation that improves the metric
    (so a run cut short still leaves its best checkpoint behind).
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
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from training import data as D
from training.evaluate import SamplerSettings, evaluate_sudoku, text_samples, text_val_loss
from training.model import (
    build_config,
    build_model,
    diffusion_loss,
    param_bytes,
    param_count,
    storage_dtype,
    unique_parameters,
)
from worker.checkpoints import EOS_ID, EOT_ID, generation_config, save_checkpoint, train_tokenizer


@dataclass
class TrainConfig:
    task: str  # "sudoku" | "text"
    out: str
    preset: str = ""  # defaults to the task's preset ("smoke" with --smoke)
    arch: dict = field(default_factory=dict)  # text-config overrides on top of the preset
    device: str = "auto"
    seed: int = 0
    batch_size: int = 0  # 0: per device default
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
    compile: bool = False
    safe: bool = False  # transformers' own code paths only: no dense experts / fused norm / autocast / fused AdamW
    threads: int = 0
    smoke: bool = False
    # sudoku
    base_grids: int = 0  # 0: default
    min_blanks: int = 40
    max_blanks: int = 64
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


# ------------------------------------------------------------------------------------------- helpers

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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


# -------------------------------------------------------------------------------------------- tasks

class Task:
    """What differs between sudoku and text: data, batches, evaluation, generation config, metadata."""

    name: str
    metric_name: str

    def batch(self, step: int) -> dict: ...

    def evaluate(self, model, final: bool) -> dict: ...

    def metric(self, result: dict) -> float: ...  # higher is better

    def generation_config(self): ...

    def metadata(self) -> dict: ...


class SudokuTask(Task):
    name = "sudoku"
    metric_name = "solve_rate"

    def __init__(self, cfg: TrainConfig, device: torch.device, log):
        self.cfg, self.device = cfg, device
        n_grids = cfg.base_grids or (16 if cfg.smoke else 600)
        t = time.time()
        grids = D.base_grids(n_grids, seed=cfg.seed)
        log(f"sudoku: {n_grids} random base grids in {time.time() - t:.1f}s")
        self.sampler = D.SudokuSampler(grids, device, seed=cfg.seed + 1, min_blanks=cfg.min_blanks,
                                       max_blanks=cfg.max_blanks)
        self.tokenizer = D.sudoku_tokenizer()
        self.vocab_size = len(self.tokenizer)
        self.canvas_length = D.SUDOKU_CANVAS
        eval_set = D.load_sudoku_eval_set()
        n_eval = cfg.eval_puzzles or (8 if cfg.smoke else len(eval_set))
        self.eval_set = eval_set.subset(n_eval)
        self.settings = SamplerSettings(max_denoising_steps=4 if cfg.smoke else cfg.sampler_steps)

    def batch(self, step: int) -> dict:
        b = self.sampler.sample(self.cfg.batch_size)
        return dict(prompt=b.prompt, clean=b.canvas, fixed=b.fixed)

    def evaluate(self, model, final: bool) -> dict:
        # the sampler costs up to `sampler_steps` decoder passes: every evaluation on GPU, only at the end on CPU
        cuda = self.device.type == "cuda"
        run_sampler = final or cuda
        result = evaluate_sudoku(model, self.eval_set, self.device, self.settings, seed=self.cfg.seed + 99,
                                 sampler=run_sampler)
        if final and cuda and not self.cfg.smoke:
            # the checkpoint's generation_config takes the better of the default and a colder schedule
            cold = SamplerSettings(max_denoising_steps=self.settings.max_denoising_steps, t_min=0.1, t_max=0.5)
            other = evaluate_sudoku(model, self.eval_set, self.device, cold, seed=self.cfg.seed + 99)
            result["sweep"] = [{"t_min": s.t_min, "t_max": s.t_max, "solve_rate": r["solve_rate"],
                                "mean_steps": r["mean_steps"]} for s, r in ((self.settings, result), (cold, other))]
            if other["solve_rate"] > result["solve_rate"]:
                self.settings = cold
                other["sweep"] = result["sweep"]
                result = other
        return result

    def metric(self, result: dict) -> float:
        return result.get("solve_rate", 0.0) + 1e-3 * result["one_shot_cell_acc"]

    def generation_config(self):
        s = self.settings
        return generation_config(
            max_new_tokens=D.SUDOKU_CANVAS, max_denoising_steps=s.max_denoising_steps, t_min=s.t_min,
            t_max=s.t_max, stability_threshold=s.stability_threshold, confidence_threshold=s.confidence_threshold,
            sampler_config={"entropy_bound": s.entropy_bound, "_cls_name": "EntropyBoundSamplerConfig"},
        )

    def metadata(self) -> dict:
        return {
            "format": {
                "prompt": "<bos> + 81 characters, row-major; blank = '0' (or '.')",
                "canvas": "81 solution digits; clamp the givens with a template (position -> digit token id)",
                "alphabet": D.SUDOKU_ALPHABET,
                "digit_token_id": "9 + digit",
            },
            "data": {"base_grids": len(self.sampler.grids), "blanks": [self.cfg.min_blanks, self.cfg.max_blanks],
                     "eval": "bundled qqwing puzzles (training/data/sudoku_eval.csv)",
                     "eval_puzzles": len(self.eval_set)},
        }


class TextTask(Task):
    name = "text"
    metric_name = "neg_val_loss"

    def __init__(self, cfg: TrainConfig, device: torch.device, log):
        self.cfg, self.device, self.log = cfg, device, log
        t = time.time()
        if cfg.smoke:
            docs, self.corpus_path = D.load_corpus(D.MINI_CORPUS_PATH), str(D.MINI_CORPUS_PATH)
            docs = docs[:60]
        else:
            docs, self.corpus_path = D.resolve_corpus(cfg.corpus, log=log)
        train_docs, val_docs = D.split_documents(docs, cfg.val_fraction, seed=cfg.seed)
        vocab = min(cfg.vocab_size, 400) if cfg.smoke else cfg.vocab_size
        self.tokenizer = train_tokenizer((D.document_text(d) for d in train_docs), vocab_size=vocab)
        self.vocab_size = len(self.tokenizer)
        train_ids = D.render_documents(train_docs, self.tokenizer, seed=cfg.seed, chat_fraction=cfg.chat_fraction)
        val_ids = D.render_documents(val_docs, self.tokenizer, seed=cfg.seed + 1, chat_fraction=cfg.chat_fraction)
        self.canvas_length = cfg.canvas_length
        max_prompt = max(cfg.prompt_lengths)
        self.train = D.TextSampler(train_ids, cfg.canvas_length, device, seed=cfg.seed + 1, max_prompt=max_prompt)
        self.val = D.TextSampler(val_ids, cfg.canvas_length, device, seed=cfg.seed + 2, max_prompt=max_prompt)
        self.docs = (len(train_docs), len(val_docs))
        log(f"text: corpus {self.corpus_path}: {len(docs)} documents, tokenizer {self.vocab_size} tokens, "
            f"{self.train.tokens} train / {self.val.tokens} val tokens, in {time.time() - t:.1f}s")
        self.gen = torch.Generator()
        self.gen.manual_seed(cfg.seed + 3)
        n_val = 2 if cfg.smoke else 8
        bs = min(cfg.batch_size, 256)
        self.val_batches = [(bs, cfg.prompt_lengths[i % len(cfg.prompt_lengths)]) for i in range(n_val)]
        self.autocast = nullcontext

    def batch(self, step: int) -> dict:
        # one context length per batch (no padding); drawn on the CPU so that it costs no device sync
        plen = self.cfg.prompt_lengths[int(torch.randint(len(self.cfg.prompt_lengths), (1,), generator=self.gen))]
        prompt, canvas = self.train.sample(self.cfg.batch_size, plen)
        return dict(prompt=prompt, clean=canvas)

    def evaluate(self, model, final: bool) -> dict:
        result = {"val_loss": text_val_loss(model, self.val, self.val_batches, seed=self.cfg.seed + 7,
                                            autocast=self.autocast)}
        if final:
            prompts = ["In the beginning", "And Jesus said unto them,",
                       [{"role": "user", "content": "Tell me a fortune."}]]
            try:
                result["samples"] = text_samples(model, self.tokenizer, prompts, self.device,
                                                 max_new_tokens=2 * self.canvas_length, seed=self.cfg.seed)
            except Exception as exc:  # samples are informative only; never lose a checkpoint over them
                result["samples_error"] = repr(exc)
        return result

    def metric(self, result: dict) -> float:
        return -result["val_loss"]

    def generation_config(self):
        return generation_config(max_new_tokens=3 * self.canvas_length, max_denoising_steps=32,
                                 eos_token_id=[EOS_ID, EOT_ID])

    def metadata(self) -> dict:
        return {
            "format": {"prompt": "plain text (<bos> added by the tokenizer) or the Gemma chat template",
                       "canvas_length": self.canvas_length, "eos": [EOS_ID, EOT_ID]},
            "data": {"corpus": self.corpus_path, "documents_train_val": list(self.docs),
                     "train_tokens": self.train.tokens, "val_tokens": self.val.tokens,
                     "prompt_lengths": list(self.cfg.prompt_lengths), "chat_fraction": self.cfg.chat_fraction},
        }


# --------------------------------------------------------------------------------------------- defaults

def apply_defaults(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    cfg = copy.deepcopy(cfg)
    cuda = device.type == "cuda"
    if not cfg.preset:
        cfg.preset = "smoke" if cfg.smoke else cfg.task
    if not cfg.batch_size:
        if cfg.smoke:
            cfg.batch_size = 8
        elif cfg.task == "sudoku":
            cfg.batch_size = 512 if cuda else 32
        else:
            cfg.batch_size = 512 if cuda else 16
    if not cfg.lr:
        cfg.lr = 2e-3 if cuda else 1e-3
    if not cfg.warmup_steps:
        cfg.warmup_steps = 5 if cfg.smoke else (150 if cuda else 20)
    if not cfg.eval_every_seconds:
        cfg.eval_every_seconds = 30.0 if cuda else 120.0
    if cfg.smoke:
        cfg.max_steps = cfg.max_steps or 6
        cfg.prompt_lengths = (8, 16)
        cfg.canvas_length = min(cfg.canvas_length, 16)
    return cfg


# ------------------------------------------------------------------------------------------------ train

def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train, evaluate, save. Returns the summary (also written to `<out>/dgserve.json`)."""
    device = resolve_device(cfg.device)
    cfg = apply_defaults(cfg, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    task: Task = SudokuTask(cfg, device, log) if cfg.task == "sudoku" else TextTask(cfg, device, log)
    config = build_config(cfg.preset, task.vocab_size, task.canvas_length, **cfg.arch)
    model = build_model(config, cfg.seed, fast=not cfg.safe).to(device)
    init_from = None
    if cfg.init:  # continue training a saved checkpoint: its weights, this run's schedule and data
        from transformers import DiffusionGemmaForBlockDiffusion

        source = DiffusionGemmaForBlockDiffusion.from_pretrained(cfg.init, dtype=torch.float32)
        model.load_state_dict(source.state_dict())
        meta = Path(cfg.init) / "dgserve.json"
        previous = json.loads(meta.read_text()) if meta.exists() else {}
        init_from = {"path": str(cfg.init), "steps": previous.get("steps"), "seed": previous.get("seed"),
                     "device": previous.get("device"), "git": previous.get("versions", {}).get("git")}
        log(f"{task.name}: initialised from {cfg.init} (trained {init_from['steps']} steps before)")
        if isinstance(task, SudokuTask) and not cfg.smoke:  # evaluate (and ship) with the sampling it was tuned to
            gc = source.generation_config
            task.settings = SamplerSettings(
                max_denoising_steps=gc.max_denoising_steps, t_min=gc.t_min, t_max=gc.t_max,
                entropy_bound=gc.sampler_config.entropy_bound, stability_threshold=gc.stability_threshold,
                confidence_threshold=gc.confidence_threshold)
        del source
    model.train()
    model.generation_config = task.generation_config()
    save_dtype = storage_dtype(model)
    log(f"{task.name}: preset {cfg.preset}, {param_count(model) / 1e6:.2f}M parameters "
        f"({param_bytes(model, save_dtype) / 1e6:.1f} MB as {str(save_dtype).removeprefix('torch.')}), "
        f"device {device_name(device)}, batch {cfg.batch_size}, lr {cfg.lr}" + (" [safe mode]" if cfg.safe else ""))
    if cfg.compile:  # experimental: regional compilation of the transformer layers
        for layer in list(model.model.decoder.layers) + list(model.model.encoder.language_model.layers):
            layer.compile()

    opt = make_optimizer(model, cfg, device)
    use_bf16 = device.type == "cuda" and not cfg.safe
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else nullcontext
    if isinstance(task, TextTask):
        task.autocast = autocast
    loss_gen = torch.Generator(device=device)
    loss_gen.manual_seed(cfg.seed + 11)

    # the last evaluation and the save must fit in the budget too
    reserve = 2.0 if cfg.smoke else (8.0 if device.type == "cuda" else 20.0)
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

    def summary(final: bool) -> dict:
        now = time.time()
        return {
            "kind": task.name, "trained": True, "final": final, "seed": cfg.seed, "steps": step,
            "examples": examples, "loss": last_loss, "train_seconds": round(now - train_start, 1),
            "wall_seconds": round(now - cfg.started, 1), "device": device_name(device),
            "params": param_count(model), "dtype_saved": str(save_dtype).removeprefix("torch."),
            "eval": best.get("result"), "eval_step": best.get("step"),
            "history": history, "evals": [{k: v for k, v in e.items() if k != "samples"} for e in evals],
            "config": {k: v for k, v in asdict(cfg).items() if k != "started"}, "init_from": init_from,
            "model_config": build_config_summary(model),
            "versions": {"torch": torch.__version__, "transformers": _transformers_version(),
                         "python": platform.python_version(), "git": git_commit()},
            **task.metadata(),
        }

    while True:
        if cfg.max_steps and step >= cfg.max_steps:
            break
        now = time.time()
        if now >= deadline:
            break
        progress_frac = max(step / cfg.max_steps if cfg.max_steps else 0.0,
                            (now - train_start) / train_window if cfg.max_seconds else 0.0)
        lr = lr_at(step, progress_frac, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        try:
            batch = task.batch(step)
            with autocast():
                out_step = diffusion_loss(model, batch["prompt"], batch["clean"], loss_gen,
                                          fixed=batch.get("fixed"), sc_prob=cfg.sc_prob)
            out_step.loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(unique_parameters(model), cfg.grad_clip, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        except torch.OutOfMemoryError:
            if cfg.batch_size <= 16:
                raise
            batch = out_step = None
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            cfg.batch_size //= 2
            log(f"WARNING: out of memory at step {step}; batch size halved to {cfg.batch_size}")
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
                                "lr": lr, "steps_per_s": round(rate, 2)})
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
    log(f"{task.name}: {step} steps in {train_time:.1f}s ({step / max(1e-9, train_time):.2f} steps/s, "
        f"{examples / max(1e-9, train_time):.0f} examples/s), last loss {last_loss:.4f}")
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
