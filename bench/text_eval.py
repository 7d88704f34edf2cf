"""English evaluation of the text checkpoint THROUGH THE RUNNING SERVICE: N samples, the fraction of
generated words found in an English word list (Debian's `wamerican`), and the mean denoising steps per canvas.

    python bench/text_eval.py                  # starts `dgserve up` itself
    python bench/text_eval.py --url http://127.0.0.1:8000 --samples 100

Writes bench/results/text_eval.json (with every sample) and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.service_runner import service  # noqa: E402

WORDS = Path("/usr/share/dict/words")
OPENERS = ["And the LORD said", "In the beginning", "Blessed are they", "The wise man", "A fool and his money",
           "And it came to pass", "Love is", "Thou shalt", "The sun", "Behold", "My son, hear", "The night",
           "He that", "There is a time", "A friend", "Let us", "The king", "Now the serpent", "Happy is",
           "Never trust"]
WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def dictionary() -> set[str]:
    if not WORDS.exists():
        raise SystemExit(f"{WORDS} not found: apt-get install wamerican")
    return {w.strip().lower() for w in WORDS.read_text(errors="ignore").splitlines() if w.strip()}


def in_dictionary(word: str, words: set[str]) -> bool:
    w = word.lower()
    return w in words or w.split("'")[0] in words


async def sample(url: str, n: int, max_new_tokens: int, concurrency: int, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    prompts = [rnd.choice(OPENERS) for _ in range(n)]
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int, prompt: str) -> dict:
            async with sem:
                r = await client.post("/generate", json={"prompt": prompt, "model": "text", "seed": seed + i,
                                                         "max_new_tokens": max_new_tokens})
                r.raise_for_status()
                body = r.json()
            return {"prompt": prompt, "text": body["text"], "usage": body["usage"], "finish": body["finish_reason"]}
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url")
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "text_eval.json")
    args = p.parse_args(argv)
    words = dictionary()
    with service(args.url, ["text"]) as url:
        t = time.perf_counter()
        samples = asyncio.run(sample(url, args.samples, args.max_new_tokens, args.concurrency, args.seed))
        seconds = time.perf_counter() - t
    found = total = 0
    for s in samples:
        ws = WORD_RE.findall(s["text"])
        s["words"] = len(ws)
        s["dictionary_words"] = sum(in_dictionary(w, words) for w in ws)
        found += s["dictionary_words"]
        total += len(ws)
    steps_per_canvas = [s["usage"]["denoising_steps"] / s["usage"]["canvases"] for s in samples]
    report = {"benchmark": "text-eval", "samples": len(samples), "max_new_tokens": args.max_new_tokens,
              "word_list": str(WORDS), "words": total, "dictionary_fraction": round(found / max(total, 1), 4),
              "mean_denoising_steps_per_canvas": round(statistics.mean(steps_per_canvas), 2),
              "tokens_per_forward": round(statistics.mean(s["usage"]["tokens_per_forward"] for s in samples), 3),
              "seconds": round(seconds, 1), "examples": samples}
    print(f"{len(samples)} samples, {total} words: {report['dictionary_fraction']:.1%} in {WORDS}; "
          f"mean {report['mean_denoising_steps_per_canvas']} denoising steps per canvas", flush=True)
    for s in samples[:3]:
        print(f"  {s['prompt']!r} -> {s['text'][:120]!r}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    plot(samples, report, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


def plot(samples: list[dict], report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = [s["dictionary_words"] / s["words"] * 100 for s in samples if s["words"]]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(fractions, bins=20, color="#2a7")
    ax.axvline(92, color="#c33", ls="--", lw=1, label="goal 92% (issue 17)")
    ax.axvline(report["dictionary_fraction"] * 100, color="#333", lw=1.5,
               label=f"overall {report['dictionary_fraction']:.1%}")
    ax.set_xlabel("dictionary words per sample (%)")
    ax.set_ylabel("samples")
    ax.set_title(f"text checkpoint through the service: {report['samples']} samples", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
