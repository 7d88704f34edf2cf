"""Sudoku evaluation THROUGH THE RUNNING SERVICE: fresh qqwing puzzles (unique solutions), all four
difficulties, solved by POST /sudoku; a puzzle counts only when fully correct (every cell a digit, givens
untouched, every row, column and box valid).

    python bench/sudoku_eval.py                       # starts `dgserve up` itself
    python bench/sudoku_eval.py --url http://127.0.0.1:8000 --per-difficulty 50 --attempts 1,8

Writes bench/results/sudoku_eval.json and a PNG. Needs Debian's `qqwing` (else the bundled held-out set).
Every puzzle is checked against the training bank (training/data/sudoku_bank.npz, digits relabelled
included): one that training saw would be dropped and counted in the JSON (`seen_in_training`).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.service_runner import service  # noqa: E402
from protocol.sudoku import is_valid_solution  # noqa: E402
from training.sudoku_bank import BANK_PATH, DIFFICULTIES, bank_keys, load_bank, puzzle_keys  # noqa: E402


def qqwing_puzzles(per: int, seed: int) -> tuple[list[dict], str]:
    if shutil.which("qqwing"):
        out = []
        for d in DIFFICULTIES:
            text = subprocess.run(["qqwing", "--generate", str(per), "--difficulty", d, "--csv", "--solution"],
                                  capture_output=True, text=True, check=True).stdout
            rows = [line.split(",") for line in text.splitlines()[1:] if line.strip()]
            out += [{"difficulty": d, "puzzle": r[0].replace(".", "0"), "solution": r[1]} for r in rows[:per]]
        return out, "qqwing (fresh, unique solutions)"
    bundled = ROOT / "training" / "data" / "sudoku_eval.csv"
    rows = list(csv.DictReader(bundled.open()))
    out = []
    for d in DIFFICULTIES:
        out += [{"difficulty": d, "puzzle": r["puzzle"].replace(".", "0"), "solution": r["solution"]}
                for r in rows if r.get("difficulty") == d][:per]
    return out, f"bundled held-out qqwing set {bundled.name} (qqwing not installed)"


def unseen_in_training(puzzles: list[dict]) -> tuple[list[dict], int]:
    """The puzzles that are not in the training bank (compared up to a relabelling of the digits)."""
    if not BANK_PATH.exists():
        return puzzles, 0
    seen = bank_keys(load_bank(BANK_PATH))

    def digits(text: str) -> list[int]:
        return [int(c) if c.isdigit() else 0 for c in text]

    keep = [p for p in puzzles if not puzzle_keys(np.array([digits(p["puzzle"])], np.uint8),
                                                   np.array([digits(p["solution"])], np.uint8)) & seen]
    return keep, len(puzzles) - len(keep)


async def solve_all(url: str, puzzles: list[dict], attempts: int, concurrency: int, seed: int,
                    sampling: dict | None = None) -> list[dict]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int, p: dict) -> dict:
            async with sem:
                t = time.perf_counter()
                r = await client.post("/sudoku", json={"puzzle": p["puzzle"], "attempts": attempts,
                                                       "seed": seed + 1000 * i, **(sampling or {})})
                r.raise_for_status()
                body = r.json()
            correct = is_valid_solution(p["puzzle"], body["solution"])
            return {**p, "answer": body["solution"], "correct": correct, "server_valid": body["valid"],
                    "matches_qqwing": body["solution"] == p["solution"], "steps": body["steps"],
                    "total_steps": body["total_steps"], "seconds": round(time.perf_counter() - t, 3)}
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(puzzles)))


def summarize(results: list[dict]) -> dict:
    out = {}
    for d in (*DIFFICULTIES, "all"):
        rs = [r for r in results if d == "all" or r["difficulty"] == d]
        if rs:
            out[d] = {"puzzles": len(rs), "fully_correct": round(sum(r["correct"] for r in rs) / len(rs), 4),
                      "mean_denoising_steps": round(statistics.mean(r["steps"] for r in rs), 2),
                      "mean_total_steps": round(statistics.mean(r["total_steps"] for r in rs), 2),
                      "mean_seconds": round(statistics.mean(r["seconds"] for r in rs), 3)}
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    runs = report["runs"]
    width = 0.8 / max(1, len(runs))
    for k, (attempts, run) in enumerate(runs.items()):
        vals = [run["summary"][d]["fully_correct"] * 100 for d in (*DIFFICULTIES, "all")]
        ax.bar([i + k * width for i in range(5)], vals, width, label=f"{attempts} attempt(s)")
    ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(5)], [*DIFFICULTIES, "all"])
    ax.axhline(90, color="#c33", ls="--", lw=1, label="goal 90% (default attempts)")
    ax.axhline(70, color="#e93", ls=":", lw=1, label="goal 70% (one attempt)")
    ax.set_ylabel("fully correct (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Sudoku through the service ({report['puzzles']} qqwing puzzles)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running service (default: start `dgserve up` here)")
    p.add_argument("--per-difficulty", type=int, default=50)
    p.add_argument("--attempts", default="1,8", help="comma list: samples per puzzle, the first valid wins")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampling", type=json.loads, default=None,
                   help='overrides of the checkpoint\'s sampling, e.g. \'{"t_min": 0.4, "t_max": 0.8}\'')
    p.add_argument("--puzzles-from", type=Path, help="reuse the puzzles of an earlier results JSON")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sudoku_eval.json")
    args = p.parse_args(argv)
    if args.puzzles_from:
        earlier = json.loads(args.puzzles_from.read_text())
        first = next(iter(earlier["runs"].values()))["results"]
        puzzles = [{k: r[k] for k in ("difficulty", "puzzle", "solution")} for r in first]
        source = f"{earlier['source']} (reused from {args.puzzles_from.name})"
    else:
        puzzles, source = qqwing_puzzles(args.per_difficulty, args.seed)
    puzzles, seen = unseen_in_training(puzzles)
    report = {"benchmark": "sudoku-eval", "source": source, "puzzles": len(puzzles), "seen_in_training": seen,
              "sampling": args.sampling, "runs": {}}
    with service(args.url, ["sudoku"]) as url:
        for attempts in (int(a) for a in args.attempts.split(",")):
            t = time.perf_counter()
            results = asyncio.run(solve_all(url, puzzles, attempts, args.concurrency, args.seed, args.sampling))
            summary = summarize(results)
            report["runs"][str(attempts)] = {"seconds": round(time.perf_counter() - t, 1), "summary": summary,
                                             "results": results}
            print(f"attempts={attempts}: " + ", ".join(f"{d} {s['fully_correct']:.0%}" for d, s in summary.items())
                  + f" (mean steps {summary['all']['mean_denoising_steps']})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
