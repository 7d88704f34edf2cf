"""The workload: requests whose prompts the gateway's tokenizer turns into exactly `--prompt-tokens` ids, their
seeds and parameters, the record of one request as a mode measures it, and the checkpoint they run on."""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from protocol import contract

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Req:
    client: int
    index: int  # within the client
    ref: str
    prompt: str  # what the WebSocket client sends
    prompt_ids: list[int]  # what the gateway's tokenizer makes of it (what the engine mode gets)
    seed: int
    max_new_tokens: int
    steps: int  # max_denoising_steps


@dataclass
class Record:
    """One request, timed from the moment it was sent (service) or added (engine)."""

    client: int
    index: int
    ref: str
    seed: int
    run: int = 0  # which measured run (repeat)
    sent_s: float = 0.0  # after the start of the run
    prompt_tokens: int | None = None
    queued_s: float | None = None
    first_step_s: float | None = None
    first_canvas_s: float | None = None
    e2e_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)  # every step event, after sending
    steps_expected: int | None = None  # usage.denoising_steps of the final event
    steps_in_order: bool = True  # canvas, step numbered 1.. within each canvas, no gap
    canvases: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)
    _last: tuple[int, int] = (0, 0)  # (canvas, step) of the previous step event

    def on_step(self, t: float, canvas: int, step: int) -> None:
        self.step_times_s.append(t)
        if self.first_step_s is None:
            self.first_step_s = t
        want = (canvas, self._last[1] + 1) if canvas == self._last[0] else (self._last[0] + 1, 1)
        if (canvas, step) != want:
            self.steps_in_order = False
        self._last = (canvas, step)

    def on_canvas(self, t: float) -> None:
        self.canvases += 1
        if self.first_canvas_s is None:
            self.first_canvas_s = t

    def on_done(self, t: float, token_ids: list[int], completion_tokens: int, steps: int, finish_reason: str) -> None:
        self.e2e_s, self.token_ids, self.completion_tokens = t, list(token_ids), completion_tokens
        self.steps_expected, self.finish_reason = steps, finish_reason

    def on_error(self, t: float, code: str | None, message: str | None) -> None:
        self.e2e_s, self.error = t, f"{code}: {message}"[:300]

    def on_restarted(self) -> None:
        """Another attempt (its worker died): its steps and canvases count from the start again."""
        self.step_times_s.clear()
        self._last, self.canvases, self.first_step_s, self.first_canvas_s = (0, 0), 0, None, None

    @property
    def step_gaps_s(self) -> list[float]:
        s = self.step_times_s
        return [b - a for a, b in zip(s, s[1:], strict=False)]

    def raw(self) -> dict:
        r = 6
        out = {k: v for k, v in asdict(self).items() if k not in ("step_times_s", "token_ids", "_last")}
        for k in ("sent_s", "queued_s", "first_step_s", "first_canvas_s", "e2e_s"):
            out[k] = None if out[k] is None else round(out[k], r)
        out["steps_received"] = len(self.step_times_s)
        out["step_gaps_s"] = [round(g, r) for g in self.step_gaps_s]
        out["tokens_sha1"] = hashlib.sha1(json.dumps(self.token_ids).encode()).hexdigest()[:12]
        return out


def single_token_words(tokenizer) -> list[str]:
    """Space-led words that the tokenizer keeps as one token each (so prompts have exact lengths)."""
    words = []
    for tok in tokenizer.get_vocab():
        word = tok[1:] if tok.startswith(("\u0120", "\u2581")) else None  # byte-level / sentencepiece space
        if word and word.isascii() and word.isalpha() and len(word) >= 2:
            if len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1:
                words.append(" " + word)
    return sorted(words) or [" " + w for w in "the quick brown fox jumps over the lazy dog".split()]


def make_prompt(encode, words: list[str], rnd: random.Random, target: int) -> tuple[str, list[int]]:
    """Text of random words whose encoding has `target` tokens (or the closest found)."""
    text, ids = "", encode("")
    while len(ids) < target:
        for _ in range(20):  # prefer a word that does not overshoot
            cand = text + rnd.choice(words)
            cand_ids = encode(cand)
            if len(cand_ids) <= target:
                break
        if len(cand_ids) > target and len(ids) > 0:
            break
        text, ids = cand, cand_ids
    return text, ids


def build_workload(served, args) -> list[Req]:
    rnd = random.Random(args.seed)
    words = single_token_words(served.tokenizer)
    reqs = []
    for c in range(args.clients):
        for j in range(args.requests_per_client):
            text, ids = make_prompt(served.encode_prompt, words, rnd, args.prompt_tokens)
            k = c * args.requests_per_client + j
            reqs.append(Req(c, j, f"c{c}r{j}", text, ids, args.seed + k, args.max_new_tokens, args.steps))
    return reqs


def warmup_workload(reqs: list[Req], n: int) -> list[Req]:
    """`n` requests like the measured ones (other seeds, one per client), to take first-call costs out."""
    return [Req(i, 0, f"warm{i}", r.prompt, r.prompt_ids, 10_000_000 + i, r.max_new_tokens, r.steps)
            for i, r in enumerate(reqs[:n])]


def engine_params(served, r: Req) -> contract.Sampling:
    """The gateway's resolution of a request's sampling parameters (checkpoint defaults + what was sent)."""
    d = {**served.defaults, "max_new_tokens": r.max_new_tokens, "max_denoising_steps": r.steps}
    return contract.Sampling(seed=r.seed, eos_token_ids=tuple(served.eos_token_ids), **d)


def resolve_checkpoint(args) -> tuple[str, str]:
    if args.checkpoint:
        path, kind = Path(args.checkpoint), "given"
    elif (REPO / "models" / "text" / "config.json").exists():
        path, kind = REPO / "models" / "text", "trained (models/text)"
    else:
        from training.checkpoints import build_random_checkpoint

        path = Path(tempfile.mkdtemp(prefix="dg-bench-ckpt-")) / "random"
        print(f"models/text does not exist: building an UNTRAINED checkpoint (canvas 32) in {path}", flush=True)
        build_random_checkpoint(path, canvas_length=32)
        return str(path), "untrained random checkpoint (models/text absent; built by bench/serve.py, canvas 32)"
    extra = path / "dgserve.json"
    if extra.exists() and json.loads(extra.read_text()).get("kind") == "random":
        kind = f"untrained random checkpoint ({path.name})"
    return str(path), kind
