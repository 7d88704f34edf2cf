"""`dgserve train ...` (also `python -m training ...`): train the small checkpoints dgserve ships."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _run_options(p: argparse.ArgumentParser) -> None:
    """How a run is set up: what training and the throughput measurement share."""
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=0, help="default: 4096 sudoku / 512 text on CUDA, small on CPU")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--init", default=None,
                   help="continue from this checkpoint's weights (same architecture; text: and its tokenizer)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the transformer layers (default: on CUDA only)")
    p.add_argument("--safe", action="store_true",
                   help="fallback: transformers' own code paths only (no dense experts, fused norm, bf16, fused AdamW)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="checkpoint directory")
    _run_options(p)
    p.add_argument("--preset", default="", help="model size preset (default: the task's; 'smoke' with --smoke)")
    p.add_argument("--arch", default="", help="text-config overrides, e.g. hidden_size=128,num_hidden_layers=4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.0,
                   help="peak learning rate (default: 2e-3 CUDA, 1e-3 with --init or on a CPU)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="wall-clock budget of the whole command, setup, final evaluation and save included")
    p.add_argument("--eval-every", type=float, default=0.0, help="seconds between evaluations")
    p.add_argument("--eval-every-steps", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sc-prob", type=float, default=0.5, help="fraction of examples trained with self-conditioning")
    p.add_argument("--smoke", action="store_true", help="CI mode: tiny model, a few steps, seconds on a CPU")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def build_parser(prog: str = "python -m training") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sudoku", help="train the sudoku checkpoint")
    _common(s)
    s.add_argument("--bank", default=None, help="puzzle bank .npz (default training/data/sudoku_bank.npz)")
    s.add_argument("--reveal-prob", type=float, default=0.1,
                   help="share of training puzzles made easier by revealing extra givens")
    s.add_argument("--eval-puzzles", type=int, default=0, help="qqwing puzzles to evaluate on (0: all 256)")
    s.add_argument("--sampler-steps", type=int, default=32, help="max_denoising_steps of the checkpoint")

    t = sub.add_parser("text", help="train the tiny English checkpoint")
    _common(t)
    t.add_argument("--corpus", default=None, help="corpus .jsonl(.gz) (default: build/corpus.jsonl.gz, built "
                                                  "if missing and possible, else the bundled excerpt)")
    t.add_argument("--vocab-size", type=int, default=2048)
    t.add_argument("--canvas-length", type=int, default=64)
    t.add_argument("--chat-fraction", type=float, default=0.2)

    c = sub.add_parser("corpus", help="dump the text corpus (KJV + fortunes + Devil's Dictionary) to a file")
    c.add_argument("--out", default=None, help="default build/corpus.jsonl.gz")
    c.add_argument("--mini", action="store_true", help="rebuild the bundled excerpt training/data/mini_corpus.jsonl")

    e = sub.add_parser("sudoku-evalset", help="regenerate the qqwing evaluation puzzles")
    e.add_argument("--out", default=None, help="default training/data/sudoku_eval.csv")
    e.add_argument("--per-difficulty", type=int, default=64)

    b = sub.add_parser("sudoku-bank", help="generate, rate and pack the unique-solution training puzzles (gcc, qqwing)")
    b.add_argument("--out", default=None, help="default training/data/sudoku_bank.npz")
    b.add_argument("--puzzles", type=int, default=96_000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--workers", type=int, default=2)

    m = sub.add_parser("throughput", help="examples/s of the training step (warm-up, then timed steps)")
    m.add_argument("--task", choices=["sudoku", "text"], default="sudoku")
    _run_options(m)
    m.add_argument("--preset", default="")
    m.add_argument("--canvas-length", type=int, default=0, help="text only (default 64)")
    m.add_argument("--steps", type=int, default=10)
    m.add_argument("--warmup", type=int, default=2)
    m.add_argument("--scratch", default="/tmp/dgserve-throughput", help="unused output directory of the run")
    m.add_argument("--out", default=None, help="append the result to this JSON report")

    g = sub.add_parser("gpu", help="train both checkpoints within one time budget (the scripted GPU run)")
    g.add_argument("--out", default="models", help="parent directory: <out>/sudoku, <out>/text")
    g.add_argument("--budget", type=float, default=540.0, help="total wall-clock seconds for both models")
    g.add_argument("--init-from", default=None, help="continue <dir>/sudoku and <dir>/text (e.g. models)")
    g.add_argument("--text-canvas", type=int, default=0, help="canvas length of the text model (0: the trainer's)")
    g.add_argument("--sudoku-args", default="", help="extra arguments for the sudoku training only")
    g.add_argument("--text-args", default="", help="extra arguments for the text training only")
    g.add_argument("--sequential", action="store_true", help="one after the other instead of side by side")
    g.add_argument("--device", default="cuda", choices=["auto", "cpu", "cuda"])
    g.add_argument("--corpus", default=None)
    g.add_argument("--pack", default=None, help="also write <pack>/<name>.tar.gz and <pack>/summary.{json,txt}")
    g.add_argument("--only", choices=["sudoku", "text"], default=None)
    g.add_argument("--smoke", action="store_true")
    g.add_argument("--extra", default="", help="extra arguments for both training commands (one string)")
    return parser


def parse_arch(text: str) -> dict:
    out: dict = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = item.partition("=")
        try:
            out[key] = int(value)
        except ValueError:
            out[key] = float(value) if value.replace(".", "", 1).isdigit() else value
    return out


def main(argv: list[str] | None = None, prog: str = "python -m training") -> int:
    started = time.time()
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args, started)
    except FileNotFoundError as exc:  # a missing tool or package: say which, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, started: float) -> int:
    if args.command == "corpus":
        from training import data as D

        info = D.build_mini_corpus(args.out or D.MINI_CORPUS_PATH) if args.mini else \
            D.build_corpus(args.out or D.DEFAULT_CORPUS_PATH)
        print(json.dumps(info))
        return 0

    if args.command == "sudoku-evalset":
        from training import data as D

        path = D.write_sudoku_eval_set(args.out or D.SUDOKU_EVAL_PATH, args.per_difficulty)
        print(path)
        return 0

    if args.command == "sudoku-bank":
        from pathlib import Path

        from training import sudoku_bank as SB

        info = SB.build_bank(args.puzzles, Path(args.out) if args.out else SB.BANK_PATH, seed=args.seed,
                             workers=args.workers)
        print(json.dumps(info))
        return 0

    if args.command == "throughput":
        from training.throughput import main as throughput_main

        return throughput_main(args)

    if args.command == "gpu":
        from training.gpu import run_both

        return run_both(args, started)

    from training.train import TrainConfig, train

    cfg = TrainConfig(
        task=args.command, out=args.out, preset=args.preset, device=args.device, seed=args.seed,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
        max_seconds=args.max_seconds, eval_every_seconds=args.eval_every, eval_every_steps=args.eval_every_steps,
        log_every=args.log_every, sc_prob=args.sc_prob, init=args.init, compile=args.compile, threads=args.threads,
        safe=args.safe,
        smoke=args.smoke, started=started, arch=parse_arch(args.arch),
    )
    if args.command == "sudoku":
        cfg.bank, cfg.reveal_prob = args.bank, args.reveal_prob
        cfg.eval_puzzles, cfg.sampler_steps = args.eval_puzzles, args.sampler_steps
    else:
        cfg.corpus, cfg.vocab_size, cfg.canvas_length = args.corpus, args.vocab_size, args.canvas_length
        cfg.chat_fraction = args.chat_fraction

    def log(msg: str) -> None:
        print(f"[{args.command} {time.time() - started:6.1f}s] {msg}", flush=True)

    result = train(cfg, log=log)
    ev = result.get("eval") or {}
    headline = {k: ev[k] for k in ("solve_rate", "one_shot_cell_acc", "val_loss") if k in ev}
    log(f"saved {result['checkpoint']} ({result['checkpoint_bytes'] / 1e6:.1f} MB, step {result['saved_step']}): "
        f"{headline}")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k not in ("history", "evals")}, default=str))
    return 0
