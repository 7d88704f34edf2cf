"""Evaluation inside training.

Sudoku: the inference sampler itself, batched, in pure torch, with the givens clamped through a template exactly
as `worker.engine` does it (transformers' `generate()` has no templates): linear temperature schedule, every
position sampled, entropy-bound acceptance (clamped cells count as entropy 0), uniform renoising of the rest,
stable-and-confident stop; the committed canvas is the argmax draft. Also the cheap one-shot metric: argmax of
a single pass from a fully noised canvas.

Text: a fixed-noise validation loss, and a few `model.generate()` samples.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from protocol.sudoku import is_valid_solution
from training.data import SudokuBatch, SudokuEvalSet, batch_from_puzzles, digits_from_ids
from training.model import decode, diffusion_loss, encode
from worker.sampler import entropy_bound_accept


@dataclass
class SamplerSettings:
    max_denoising_steps: int = 32
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def sample_canvas(model, prompt: torch.Tensor, settings: SamplerSettings, generator: torch.Generator,
                  fixed: torch.Tensor | None = None, fixed_ids: torch.Tensor | None = None) -> dict:
    """Denoise one canvas per row of `prompt` (B, P). Returns the committed drafts (B, L), the number of
    denoising steps each row used and whether it stopped adaptively (before the step limit)."""
    device = prompt.device
    batch = prompt.shape[0]
    length = model.config.canvas_length
    vocab = model.config.get_text_config().vocab_size
    cache = encode(model, prompt)
    plen = prompt.shape[1]

    def clamp(x: torch.Tensor) -> torch.Tensor:
        return x if fixed is None else torch.where(fixed, fixed_ids, x)

    canvas = clamp(torch.randint(0, vocab, (batch, length), generator=generator, device=device))
    free = (~fixed).float() if fixed is not None else torch.ones(batch, length, device=device)
    sc = None
    prev = torch.full((batch, length), -1, dtype=torch.long, device=device)
    run = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    final = canvas.clone()
    steps_used = torch.zeros(batch, dtype=torch.long, device=device)
    n = settings.max_denoising_steps
    for k in range(n):
        temperature = settings.t_min + (settings.t_max - settings.t_min) * (n - k) / n
        logits = decode(model, canvas, cache, plen, sc_logits=sc).float() / temperature
        probs = torch.softmax(logits, dim=-1)
        sampled = torch.multinomial(probs.view(-1, vocab), 1, generator=generator).view(batch, length)
        draft = clamp(logits.argmax(-1))
        sampled = clamp(sampled)
        entropy = token_entropy(logits)
        if fixed is not None:
            entropy = entropy.masked_fill(fixed, 0.0)
        accepted = entropy_bound_accept(entropy, torch.full((batch,), settings.entropy_bound, device=device))
        if fixed is not None:
            accepted |= fixed
        noise = torch.randint(0, vocab, (batch, length), generator=generator, device=device)
        new_canvas = clamp(torch.where(accepted, sampled, noise))
        mean_entropy = (entropy * free).sum(-1) / free.sum(-1).clamp_min(1.0)
        same = (draft == prev).all(-1)
        run = torch.where(same, run + 1, torch.zeros_like(run))
        stop = (run >= settings.stability_threshold) & (mean_entropy < settings.confidence_threshold)
        active = ~done
        final = torch.where(active[:, None], draft, final)
        steps_used += active.long()
        canvas = torch.where(active[:, None], new_canvas, canvas)
        sc = logits.to(model.model.decoder.embed_tokens.weight.dtype)
        prev = draft
        done |= stop
        if bool(done.all()):
            break
    return {"canvas": final, "steps": steps_used, "stopped": done}


@torch.no_grad()
def sudoku_one_shot(model, batch: SudokuBatch, generator: torch.Generator) -> dict:
    """Argmax of one decoder pass from a fully noised canvas with the givens clamped, no self-conditioning."""
    vocab = model.config.get_text_config().vocab_size
    noise = torch.randint(0, vocab, batch.canvas.shape, generator=generator, device=batch.canvas.device)
    canvas = torch.where(batch.fixed, batch.canvas, noise)
    logits = decode(model, canvas, encode(model, batch.prompt), batch.prompt.shape[1])
    pred = logits.argmax(-1)
    free = ~batch.fixed
    correct = (pred == batch.canvas) & free
    return {
        "cell_acc": float(correct.sum() / free.sum().clamp_min(1)),
        "grid_acc": float(((pred == batch.canvas) | batch.fixed).all(-1).float().mean()),
    }


@torch.no_grad()
def evaluate_sudoku(model, eval_set: SudokuEvalSet, device, settings: SamplerSettings, seed: int = 1234,
                    batch_size: int = 256, sampler: bool = True) -> dict:
    """Solve rate (valid grid consistent with the givens) with the inference sampler, per difficulty, plus the
    one-shot cell accuracy. Deterministic in `seed`."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    totals: dict[str, list[float]] = defaultdict(list)
    cells, grids, weights = [], [], []
    steps, stopped = [], []
    for a in range(0, len(eval_set), batch_size):
        idx = range(a, min(len(eval_set), a + batch_size))
        batch = batch_from_puzzles([eval_set.puzzles[i] for i in idx], [eval_set.solutions[i] for i in idx], device)
        one = sudoku_one_shot(model, batch, generator)
        cells.append(one["cell_acc"])
        grids.append(one["grid_acc"])
        weights.append(len(idx))
        if sampler:
            out = sample_canvas(model, batch.prompt, settings, generator, fixed=batch.fixed, fixed_ids=batch.canvas)
            digits = digits_from_ids(out["canvas"]).tolist()
            for j, i in enumerate(idx):
                ok = is_valid_solution(eval_set.puzzles[i], digits[j])
                totals[eval_set.difficulty[i]].append(float(ok))
            steps.extend(out["steps"].tolist())
            stopped.extend(out["stopped"].tolist())
    wsum = sum(weights)
    result = {
        "one_shot_cell_acc": sum(c * w for c, w in zip(cells, weights, strict=True)) / wsum,
        "one_shot_grid_acc": sum(g * w for g, w in zip(grids, weights, strict=True)) / wsum,
        "puzzles": len(eval_set),
    }
    if sampler:
        allv = [v for vs in totals.values() for v in vs]
        result["solve_rate"] = sum(allv) / max(1, len(allv))
        result["solve_rate_by_difficulty"] = {k: sum(v) / len(v) for k, v in totals.items()}
        result["mean_steps"] = sum(steps) / max(1, len(steps))
        result["adaptive_stop_rate"] = sum(stopped) / max(1, len(stopped))
        result["sampler"] = settings.__dict__.copy()
    model.train(was_training)
    return result


@torch.no_grad()
def text_val_loss(model, sampler, batches: list[tuple[int, int]], seed: int, autocast) -> float:
    """Mean diffusion loss over fixed batches (`(batch_size, prompt_len)` each): the sampler's and the noise's
    generators are re-seeded, so every call sees exactly the same examples and noise."""
    was_training = model.training
    model.eval()
    state = sampler.generator.get_state()
    sampler.generator.manual_seed(seed)
    noise = torch.Generator(device=sampler.device)
    noise.manual_seed(seed + 1)
    total, count = 0.0, 0
    for batch_size, prompt_len in batches:
        prompt, canvas = sampler.sample(batch_size, prompt_len)
        with autocast():
            out = diffusion_loss(model, prompt, canvas, noise)
        total += float(out.loss) * batch_size
        count += batch_size
    sampler.generator.set_state(state)
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def text_samples(model, tokenizer, prompts: list[str | list[dict]], device, max_new_tokens: int,
                 seed: int = 0) -> list[dict]:
    """`model.generate()` on a few prompts (plain strings, or chat messages), one at a time."""
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    out = []
    for p in prompts:
        if isinstance(p, str):
            ids = tokenizer(p, return_tensors="pt")["input_ids"].to(device)
            shown = p
        else:
            ids = tokenizer.apply_chat_template(p, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            ids = ids["input_ids"].to(device)
            shown = "[chat] " + p[-1]["content"]
        res = model.generate(ids, max_new_tokens=max_new_tokens)
        new = res.sequences[0, ids.shape[1]:].tolist()
        tpf = res.tokens_per_forward
        out.append({
            "prompt": shown,
            "completion": tokenizer.decode(new, skip_special_tokens=True),
            "tokens_per_forward": float(tpf[0]) if tpf is not None and not math.isnan(float(tpf[0])) else None,
        })
    model.train(was_training)
    return out
