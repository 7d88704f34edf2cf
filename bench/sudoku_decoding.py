"""Does the decoding order limit the Sudoku checkpoint, or the model? In-process, on the CPU.

Runs the shipped `models/sudoku` over held-out qqwing puzzles (`training/data/sudoku_eval.csv`, spread evenly
over the four difficulties) with three decoders, one sample each, same seed:

* `entropy-bound`: the DiffusionGemma sampler as the service runs it (bound, steps and temperatures from the
  checkpoint's generation config), givens clamped;
* `entropy-bound + sticky`: the same, but a cell accepted with entropy below `--sticky` joins the template for
  the rest of the canvas (masked-diffusion style commitment);
* `greedy one cell per step`: each step commits the single lowest-entropy open cell at its argmax and clamps
  it (the adaptive-order decoding of Kim et al. 2025), 81 steps at most.

    python bench/sudoku_decoding.py [--puzzles 128] [--out bench/results/sudoku_decoding_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol import contract  # noqa: E402
from protocol.sudoku import is_valid_solution  # noqa: E402
from training.data import batch_from_puzzles, digits_from_ids, load_sudoku_eval_set  # noqa: E402
from training.evaluate import token_entropy  # noqa: E402
from training.model import decode, encode  # noqa: E402
from worker.sampler import entropy_bound_accept  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def solve(model, batch, mode: str, steps: int, t_max: float, t_min: float, bound: float, sticky: float,
          seed: int) -> torch.Tensor:
    """Denoise one canvas per puzzle; returns the final drafts (B, 81)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    B, L = batch.canvas.shape
    cache, plen = encode(model, batch.prompt), batch.prompt.shape[1]
    fixed, fixed_ids = batch.fixed.clone(), batch.canvas.clone()
    canvas = torch.where(fixed, fixed_ids, torch.randint(0, vocab, (B, L), generator=g))
    soft, draft = None, canvas
    for k in range(steps):
        temperature = t_min + (t_max - t_min) * (steps - k) / steps
        logits = decode(model, canvas, cache, plen, sc_logits=soft).float() / temperature
        sampled = torch.multinomial(torch.softmax(logits, -1).view(-1, vocab), 1, generator=g).view(B, L)
        draft = torch.where(fixed, fixed_ids, logits.argmax(-1))
        h = token_entropy(logits).masked_fill(fixed, 0.0)
        if mode == "greedy":
            pick = h.masked_fill(fixed, float("inf")).argmin(-1, keepdim=True)
            new = torch.zeros_like(fixed).scatter(-1, pick, True) & ~fixed
            fixed_ids = torch.where(new, logits.argmax(-1), fixed_ids)
            fixed = fixed | new
            accepted = fixed
        else:
            accepted = entropy_bound_accept(h, torch.full((B,), bound)) | fixed
            if sticky > 0:
                new = accepted & ~fixed & (h < sticky)
                fixed_ids = torch.where(new, sampled, fixed_ids)
                fixed = fixed | new
        noise = torch.randint(0, vocab, (B, L), generator=g)
        canvas = torch.where(fixed, fixed_ids, torch.where(accepted, sampled, noise))
        soft = logits.to(model.model.decoder.embed_tokens.weight.dtype)
        if mode == "greedy" and bool(fixed.all()):
            return fixed_ids
    return draft


def main() -> int:
    from transformers import DiffusionGemmaForBlockDiffusion

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(ROOT / "models" / "sudoku"))
    p.add_argument("--puzzles", type=int, default=128)
    p.add_argument("--sticky", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sudoku_decoding_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(args.checkpoint).eval()
    defaults = contract.sampling_defaults(model.generation_config)
    base = dict(steps=defaults["max_denoising_steps"], t_max=defaults["t_max"], t_min=defaults["t_min"],
                bound=defaults["entropy_bound"])
    ev = load_sudoku_eval_set()
    idx = list(range(0, len(ev), max(1, len(ev) // args.puzzles)))[: args.puzzles]
    batch = batch_from_puzzles([ev.puzzles[i] for i in idx], [ev.solutions[i] for i in idx], "cpu")
    variants = {
        "entropy-bound": dict(base, mode="bound", sticky=0.0),
        "entropy-bound + sticky": dict(base, mode="bound", sticky=args.sticky),
        "greedy one cell per step": dict(base, mode="greedy", sticky=0.0, steps=81),
    }
    results = {}
    for name, v in variants.items():
        started = time.time()
        drafts = digits_from_ids(solve(model, batch, seed=args.seed, **v)).tolist()
        ok = [is_valid_solution(ev.puzzles[i], d)
              for d, i in zip(drafts, idx, strict=True)]
        by = {}
        for good, i in zip(ok, idx, strict=True):
            by.setdefault(ev.difficulty[i], []).append(good)
        results[name] = {"solved": round(sum(ok) / len(ok), 3), "settings": v,
                         "seconds": round(time.time() - started, 1),
                         "by_difficulty": {k: round(sum(x) / len(x), 3) for k, x in sorted(by.items())}}
        print(f"{name:28s} {results[name]['solved']:.1%} solved  {results[name]['by_difficulty']}  "
              f"({results[name]['seconds']}s)", flush=True)
    out = {"benchmark": "sudoku-decoding", "checkpoint": args.checkpoint, "puzzles": len(idx), "seed": args.seed,
           "device": "cpu", "torch": torch.__version__, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
