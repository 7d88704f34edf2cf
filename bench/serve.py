"""Serving benchmark: the full service (Redis + gateway + a worker, real processes, WebSocket clients)
against the in-process engine, same requests, every denoising step streamed.

    python bench/serve.py                  # --compare (default): service and engine, interleaved; ratios
    python bench/serve.py --mode service --no-compare --url http://127.0.0.1:8000 --checkpoint models/text
    python bench/serve.py --mode engine --no-compare

Workload: `--clients` concurrent WebSocket connections, each sending `--requests-per-client` requests one
after another (the next when the previous one's `done` arrives); prompts of `--prompt-tokens` tokens (text
that the gateway's tokenizer turns into exactly that many ids), `--max-new-tokens` (default: 2 canvases),
`--steps` (max_denoising_steps, default: the checkpoint's), seeds `--seed` + i. The service gets one worker
with `--max-batch` / `--max-context` / `--torch-threads`, the engine the same.

Per request, from the client's side: time to `queued`, time to the first `step` event, every gap between
consecutive step events, time to the first committed `canvas`, end-to-end latency, tokens, errors by code,
and step events received against `usage.denoising_steps` (every step must arrive). The engine mode feeds
the same requests (the gateway's prompt ids, seeds and resolved parameters; each client's first request at
once, its next when the previous finished) straight into `worker.engine.Engine` and times the events when
`step()` returns them. Both modes must give the same tokens per request (checked, every run).

The measured workload runs `--repeats` times per mode, the modes alternating (S E, E S, ...) so that drift
in the machine's load hits both; summaries pool the runs (tok/s = all tokens / summed wall time). With
`--diagnose` (default) one more run puts the worker's real publisher thread beside the in-process engine
("engine+publisher"), and the JSON says where the service's time goes: worker step counts and times (its
Prometheus metrics), CPU seconds per process and of the engine loop's thread (on a CPU / waiting for a core
/ asleep, from /proc), per-event costs of detokenising, the gateway's decode + re-encode, Redis.

Writes JSON (settings, per-mode summaries, ratios, per-request raw numbers, analysis) and a PNG next to it:
bench/results/serve_cpu.{json,png} by default.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
METRICS = ("queued_s", "first_step_s", "step_interval_s", "first_canvas_s", "e2e_s")


# ------------------------------------------------------------------ workload
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


# ------------------------------------------------------------------ statistics
def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1)."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


def dist(values: list[float]) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"n": 0}
    r = lambda x: round(x, 5)  # noqa: E731
    return {"n": len(v), "p50": r(pct(v, 0.5)), "p90": r(pct(v, 0.9)), "p99": r(pct(v, 0.99)),
            "mean": r(statistics.fmean(v)), "max": r(max(v))}


def summarize(name: str, records: list[Record], runs: list[tuple[float, int]], extra: dict | None = None) -> dict:
    """Pooled over the runs: percentiles over every request (or step gap), tok/s = tokens / summed wall time."""
    ok = [r for r in records if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    wall_s = sum(w for w, _ in runs)
    received = sum(len(r.step_times_s) for r in records)
    expected = sum(r.steps_expected or 0 for r in ok)
    return {
        "name": name, "requests": len(records), "completed": len(ok),
        "errors": dict(Counter(r.error.split(":")[0] for r in records if r.error)),
        "wall_s": round(wall_s, 4), "completion_tokens": tokens,
        "tok_s": round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        "runs": [{"wall_s": round(w, 4), "tokens": n, "tok_s": round(n / w, 2) if w > 0 else 0.0} for w, n in runs],
        "queued_s": dist([r.queued_s for r in ok]),
        "first_step_s": dist([r.first_step_s for r in ok]),
        "step_interval_s": dist([g for r in ok for g in r.step_gaps_s]),
        "first_canvas_s": dist([r.first_canvas_s for r in ok]),
        "e2e_s": dist([r.e2e_s for r in ok]),
        "step_events": {"received": received, "expected": expected,
                        "missing": sum(max(0, (r.steps_expected or 0) - len(r.step_times_s)) for r in ok),
                        "requests_with_missing": [f"{r.ref}#{r.run}" for r in ok
                                                  if len(r.step_times_s) != r.steps_expected],
                        "out_of_order": [f"{r.ref}#{r.run}" for r in ok if not r.steps_in_order]},
        "finish_reasons": dict(Counter(r.finish_reason for r in ok)),
        **(extra or {}),
    }


# ------------------------------------------------------------------ service mode
def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value} (samples only)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def metric(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.split("{")[0] == prefix)


class CpuWatch:
    """CPU seconds of processes (and of the worker's threads) between `start` and `stop`."""

    def __init__(self, pids: dict[str, int]):
        import psutil

        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    def _read(self) -> tuple[dict[str, float], dict[int, float]]:
        cpu = {}
        for name, p in self.procs.items():
            t = p.cpu_times()
            cpu[name] = t.user + t.system
        threads = {}
        if "worker" in self.procs:
            threads = {t.id: t.user_time + t.system_time for t in self.procs["worker"].threads()}
            pid = self.procs["worker"].pid
            cpu["_engine_thread_run"], cpu["_engine_thread_runq"] = schedstat(pid, pid)
        return cpu, threads

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0, self.threads0 = self._read()

    def stop(self) -> tuple[float, dict[str, float], dict[int, float]]:
        """-> wall seconds, CPU seconds per process, CPU seconds per worker thread id."""
        wall = time.perf_counter() - self.t0
        cpu1, threads1 = self._read()
        return (wall, {k: cpu1[k] - self.cpu0.get(k, 0.0) for k in cpu1},
                {tid: t - self.threads0.get(tid, 0.0) for tid, t in threads1.items()})


def schedstat(pid: int, tid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a core) of one thread, from /proc (0s if absent)."""
    try:
        run_ns, wait_ns, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        return int(run_ns) / 1e9, int(wait_ns) / 1e9
    except (OSError, ValueError):
        return 0.0, 0.0


def run_info(wall: float, run: float, runq: float) -> dict:
    """How much of one run the engine loop's thread spent waiting for a core (high: the machine was busy)."""
    return {"engine_thread_on_cpu_share": round(run / wall, 3), "engine_thread_waiting_for_a_core_share":
            round(runq / wall, 3)}


def thread_time_split(wall: float, run: float, runq: float) -> dict:
    """A thread's wall time: on a CPU, runnable but waiting for a core, and the rest (sleeping: waiting for
    the GIL, a lock, I/O or work)."""
    return {"wall_s": round(wall, 3), "on_cpu_s": round(run, 3), "waiting_for_a_core_s": round(runq, 3),
            "sleeping_s": round(max(0.0, wall - run - runq), 3)}


def _thread_name(pid: int, tid: int) -> str:
    try:
        return f"{Path(f'/proc/{pid}/task/{tid}/comm').read_text().strip()}#{tid}"
    except OSError:
        return f"#{tid}"


async def _client(ws_url: str, reqs: list[Req], model: str | None, start: asyncio.Event, t0: list[float],
                  records: list[Record], timeout: float, compression: str | None, progress) -> None:
    import websockets

    try:
        ws = await websockets.connect(ws_url, max_size=None, compression=compression, open_timeout=30)
    except Exception as exc:  # noqa: BLE001
        await start.wait()
        for r in reqs:
            records.append(Record(r.client, r.index, r.ref, r.seed, error=f"connect_failed: {exc!r}"[:200]))
        return
    try:
        await start.wait()
        for r in reqs:
            rec = Record(r.client, r.index, r.ref, r.seed)
            records.append(rec)
            body = {"type": "generate", "prompt": r.prompt, "seed": r.seed, "max_new_tokens": r.max_new_tokens,
                    "max_denoising_steps": r.steps, "ref": r.ref}
            if model:
                body["model"] = model
            sent = time.perf_counter()
            rec.sent_s = sent - t0[0]
            try:
                await ws.send(json.dumps(body))
                while True:
                    raw = await asyncio.wait_for(ws.recv(), timeout)
                    now = time.perf_counter() - sent
                    ev = json.loads(raw)
                    kind = ev.get("type")
                    if kind == "step":
                        rec.on_step(now, ev["canvas"], ev["step"])
                    elif kind == "canvas":
                        rec.on_canvas(now)
                    elif kind == "queued":
                        rec.queued_s, rec.prompt_tokens = now, ev.get("prompt_tokens")
                        if ev.get("ref") != r.ref:
                            rec.error = f"ref_mismatch: {ev.get('ref')!r}"
                    elif kind == "done":
                        rec.e2e_s = now
                        rec.token_ids = ev["token_ids"]
                        rec.completion_tokens = ev["usage"]["completion_tokens"]
                        rec.steps_expected = ev["usage"]["denoising_steps"]
                        rec.finish_reason = ev["finish_reason"]
                        break
                    elif kind == "error":
                        rec.e2e_s = now
                        rec.error = f"{ev.get('code')}: {ev.get('message')}"[:300]
                        break
                    elif kind == "restarted":
                        rec.step_times_s.clear()
                        rec._last, rec.canvases, rec.first_step_s, rec.first_canvas_s = (0, 0), 0, None, None
            except TimeoutError:
                rec.error = f"client_timeout: no event for {timeout}s"
                break
            except websockets.ConnectionClosed as exc:
                rec.error = f"connection_closed: {exc}"[:300]
                break
            finally:
                progress(rec)
    finally:
        await ws.close()
    for r in reqs[len([x for x in records if x.client == reqs[0].client]):]:
        records.append(Record(r.client, r.index, r.ref, r.seed, error="not_sent: the connection failed earlier"))


async def run_clients(ws_url: str, reqs: list[Req], model: str | None, timeout: float, compression: str | None,
                      label: str, quiet: bool = False, on_start=None) -> tuple[list[Record], float]:
    """Connect every client first, then start them together; returns the records and the run's wall time."""
    by_client: dict[int, list[Req]] = {}
    for r in reqs:
        by_client.setdefault(r.client, []).append(r)
    records: list[Record] = []
    start, t0 = asyncio.Event(), [0.0]
    progress = _progress(label, len(reqs), quiet)
    tasks = [asyncio.create_task(_client(ws_url, rs, model, start, t0, records, timeout, compression, progress))
             for rs in by_client.values()]
    await asyncio.sleep(0.5)  # let the connections open (also timed out by open_timeout)
    if on_start:
        on_start()
    t0[0] = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    return sorted(records, key=lambda r: (r.client, r.index)), time.perf_counter() - t0[0]


def _progress(label: str, total: int, quiet: bool):
    state = {"n": 0}
    every = max(1, total // 16)

    def report(rec: Record) -> None:
        state["n"] += 1
        n = state["n"]
        if not quiet and (n % every == 0 or n == total or rec.error):
            what = f"e2e {rec.e2e_s:.2f}s, {len(rec.step_times_s)} steps" if rec.error is None else rec.error
            print(f"  [{label}] {n}/{total} {rec.ref}: {what}", flush=True)

    return report


def redis_costs(redis_url: str, sample_event: str, rounds: int = 200) -> dict:
    """The gateway's per-event Redis work (an XREAD that finds one event), against the live Redis."""
    import redis

    r = redis.Redis.from_url(redis_url)
    key = "bench:events:xread"
    r.xadd(key, {"e": sample_event})
    t = time.perf_counter()
    for _ in range(rounds):
        r.xread({key: "0-0"}, count=512)
    xread = (time.perf_counter() - t) / rounds
    r.delete(key)
    r.close()
    return {"gateway_xread_ms_per_call": round(xread * 1e3, 4)}


class ServiceMode:
    """The full service: started here (Redis + gateway + one worker, real processes) or at `--url`."""

    name = "service"

    def __init__(self, args, model_name: str, checkpoint: str):
        self.args, self.svc = args, None
        self.compression = None if args.ws_compression == "none" else "deflate"
        if args.url:
            self.base = args.url.rstrip("/")
            self.ws_url = self.base.replace("http://", "ws://").replace("https://", "wss://") + "/ws/generate"
            self.model = args.model
            print(f"service: using {self.base}", flush=True)
        else:
            from tests.procs import Service

            log_dir = Path(tempfile.mkdtemp(prefix="dg-bench-serve-"))
            print(f"service: starting redis + gateway + 1 {args.device} worker (max_batch {args.max_batch}, "
                  f"{args.torch_threads} torch threads); logs in {log_dir}", flush=True)
            started = time.perf_counter()
            self.svc = svc = Service({model_name: Path(checkpoint)}, log_dir)
            try:
                svc.start_gateway()
                svc.start_worker(model_name, max_batch=args.max_batch, max_context=args.max_context,
                                 torch_threads=args.torch_threads, device=args.device, log_level="WARNING")
                svc.wait_ready(timeout=240)
            except BaseException:
                svc.close()
                raise
            print(f"service: ready in {time.perf_counter() - started:.1f}s", flush=True)
            self.base, self.ws_url, self.model = svc.url, svc.ws_url, model_name
        self.worker_metrics = (f"http://127.0.0.1:{self.svc.workers[0].metrics_port}/metrics"  # type: ignore
                               if self.svc else None)
        self.cpu: dict[str, float] = {}
        self.threads: dict[int, float] = {}
        self.watched_s = 0.0
        self.worker = Counter()
        self.last_run_info: dict = {}

    def warm(self, reqs: list[Req]) -> None:
        t = time.perf_counter()
        recs, _ = asyncio.run(run_clients(self.ws_url, reqs, self.model, self.args.timeout, self.compression,
                                          "warm-up", quiet=True))
        bad = [r.error for r in recs if r.error]
        print(f"service: warm-up, {len(recs)} requests, {time.perf_counter() - t:.2f}s"
              f"{' ERRORS ' + str(bad) if bad else ''}", flush=True)

    def run(self, reqs: list[Req], label: str) -> tuple[list[Record], float]:
        before = scrape(self.worker_metrics) if self.worker_metrics else {}
        watch = None
        if self.svc:
            watch = CpuWatch({"worker": self.svc.workers[0].proc.pid, "gateway": self.svc.gateway.proc.pid,
                              "redis": self.svc.redis.proc.pid, "client (this process)": os.getpid()})
        records, wall = asyncio.run(run_clients(self.ws_url, reqs, self.model, self.args.timeout, self.compression,
                                                label, on_start=watch.start if watch else None))
        self.last_run_info = {}
        if watch:
            w, cpu, threads = watch.stop()
            if cpu.get("_engine_thread_run"):
                self.last_run_info = run_info(w, cpu["_engine_thread_run"], cpu["_engine_thread_runq"])
            self.watched_s += w
            for k, v in cpu.items():
                self.cpu[k] = self.cpu.get(k, 0.0) + v
            for k, v in threads.items():
                self.threads[k] = self.threads.get(k, 0.0) + v
        if self.worker_metrics:
            after = scrape(self.worker_metrics)
            for k in ("time_per_denoising_step_seconds_sum", "time_per_denoising_step_seconds_count",
                      "batch_size_sum"):
                self.worker[k] += metric(after, "dgserve:" + k) - metric(before, "dgserve:" + k)
        return records, wall

    def extra(self, wall_s: float, records: list[Record]) -> dict:
        out: dict = {"url": self.base, "ws_compression": self.args.ws_compression}
        sched = {k: self.cpu.pop(k) for k in [k for k in self.cpu if k.startswith("_")]}
        if self.cpu:
            cores = os.cpu_count() or 1
            total = sum(self.cpu.values())
            out["cpu"] = {"wall_s": round(self.watched_s, 3), "cores": cores,
                          "cpu_s": {k: round(v, 3) for k, v in self.cpu.items()},
                          "cpu_s_total": round(total, 3),
                          "utilisation_of_all_cores": round(total / (self.watched_s * cores), 3)}
            main = self.svc.workers[0].proc.pid  # type: ignore[union-attr]
            others = sorted(((round(v, 3), _thread_name(main, tid)) for tid, v in self.threads.items()
                             if tid != main and v > 0.0005), reverse=True)
            out["cpu"]["worker_threads_cpu_s"] = {
                "main (engine loop, torch thread 0)": round(self.threads.get(main, 0.0), 3),
                "others, busiest first (torch threads, publisher, fetcher, ...)": [list(x) for x in others[:8]]}
        n = self.worker["time_per_denoising_step_seconds_count"]
        if n:
            busy = self.worker["time_per_denoising_step_seconds_sum"]
            out["worker"] = {"steps": int(n), "mean_rows": round(self.worker["batch_size_sum"] / n, 2),
                             "step_time_ms_mean": round(busy / n * 1e3, 3), "engine_busy_s": round(busy, 3),
                             "engine_busy_share_of_wall": round(busy / wall_s, 3)}
            if self.threads:
                main_cpu = self.threads.get(self.svc.workers[0].proc.pid, 0.0)  # type: ignore[union-attr]
                out["worker"]["engine_thread_cpu_s"] = round(main_cpu, 3)
                out["worker"]["engine_thread_on_cpu_share_of_busy"] = round(main_cpu / busy, 3)
            if sched.get("_engine_thread_run"):
                out["worker"]["engine_thread_schedstat"] = thread_time_split(
                    self.watched_s, sched["_engine_thread_run"], sched["_engine_thread_runq"])
        if self.svc and self.args.breakdown:
            sample = next((r for r in records if r.error is None), None)
            width = sample.completion_tokens // max(sample.canvases, 1) if sample else 32
            ev = json.dumps({"type": "step", "request_id": "0" * 32, "canvas": 0, "step": 1,
                             "draft_ids": list(range(100, 100 + width)), "draft_text": "x" * (4 * width),
                             "accepted": 3, "mean_entropy": 1.0})
            out["redis_costs"] = redis_costs(self.svc.redis.url, ev)
        return out

    def close(self) -> None:
        if self.svc:
            self.svc.close()


class EngineMode:
    """The same requests straight into `worker.engine.Engine`, in this process.

    With `redis_url` (the diagnostic mode "engine+publisher"): the same, plus the worker's real publisher
    thread (`worker.runner.Runner._publish_loop`: detokenise, encode, write every event to Redis) beside the
    engine loop, as in the worker process; events are still timed when `step()` returns them.
    """

    def __init__(self, args, served, checkpoint: str, base: EngineMode | None = None, redis_url: str | None = None):
        self.args, self.served, self.redis_url = args, served, redis_url
        self.name = "engine+publisher" if redis_url else "engine"
        if base is not None:  # share the loaded model and engine
            self.engine, self.tokenizer = base.engine, base.tokenizer
        else:
            import torch

            from worker.engine import Engine, EngineConfig
            from worker.loading import load_model
            from worker.settings import WorkerSettings

            print(f"engine: loading {checkpoint} in-process (max_batch {args.max_batch}, {args.torch_threads} "
                  "torch threads)", flush=True)
            # what the service's worker is given (the rest: the same DG_* environment and defaults)
            ws = WorkerSettings(max_batch=args.max_batch, max_context=args.max_context, device=args.device,
                                torch_threads=args.torch_threads)
            torch.set_num_threads(ws.torch_threads)
            model, self.tokenizer = load_model(checkpoint, ws.device, ws.dtype, ws.quantization,
                                               ws.experts_implementation)
            self.engine = Engine(model, EngineConfig(max_batch=ws.max_batch, max_context=ws.max_context,
                                                     sample_chunk_rows=ws.sample_chunk_rows))
        self.step_ms: list[float] = []
        self.rows: list[int] = []
        self.capture: list = []
        self.publisher_tail_s: list[float] = []  # publisher still writing after the engine finished
        self.convert_ms: list[float] = []  # publisher: engine events -> contract events (detokenise), per step
        self.write_ms: list[float] = []  # publisher: the Redis script writing one step's events
        self.counter = 0
        self.thread_cpu_s = 0.0  # CPU time of the engine loop's thread (this one) during the runs
        self.sched = [0.0, 0.0, 0.0]  # wall, on a CPU, waiting for a core: the engine loop's thread in the runs
        self.last_run_info: dict = {}

    def warm(self, reqs: list[Req]) -> None:
        t = time.perf_counter()
        self._drive(reqs, "warm-up", quiet=True, record_steps=False)
        self.convert_ms.clear()
        self.write_ms.clear()
        print(f"{self.name}: warm-up, {len(reqs)} requests, {time.perf_counter() - t:.2f}s", flush=True)

    def run(self, reqs: list[Req], label: str) -> tuple[list[Record], float]:
        return self._drive(reqs, label)

    def _publisher(self, reqs: list[Req]):
        """The worker's publisher, fed by this engine loop; owns (in Redis) a job entry per request, as the
        worker would, so that its atomic publish script writes the events. Times its two halves."""
        import threading

        from protocol import contract
        from worker.runner import Runner, _Held

        runner = Runner(self.engine, self.tokenizer, self.redis_url, "bench-publisher", "bench-publisher")
        runner._ensure_group()
        pipe = runner.redis.pipeline(transaction=False)
        for r in reqs:
            job = contract.Job(request_id=f"{r.ref}.{self.counter}", model="bench-publisher",
                               prompt_ids=r.prompt_ids, sampling=contract.Sampling(**asdict(engine_params(
                                   self.served, r))))
            pipe.xadd(runner.stream, {contract.JOB_FIELD: contract.encode(job)})
        pipe.execute()
        reply = runner.redis.xreadgroup(contract.GROUP, runner.worker_id, {runner.stream: ">"}, count=len(reqs))
        for entry_id, fields in reply[0][1]:
            job = contract.decode_job(fields[contract.JOB_FIELD.encode()])
            runner.held[job.request_id] = _Held(job, entry_id)
        convert, write = runner._convert, runner._write

        def timed(fn, into: list[float]):
            def call(arg):
                t = time.perf_counter()
                try:
                    return fn(arg)
                finally:
                    into.append((time.perf_counter() - t) * 1e3)
            return call

        runner._convert = timed(convert, self.convert_ms)  # type: ignore[method-assign]
        runner._write = timed(write, self.write_ms)  # type: ignore[method-assign]
        thread = threading.Thread(target=runner._publish_loop, name="_publish_loop", daemon=True)
        thread.start()
        return runner, thread

    def _drive(self, reqs: list[Req], label: str, quiet: bool = False,
               record_steps: bool = True) -> tuple[list[Record], float]:
        """Each client's first request at once, its next one when the previous finished (as the clients do)."""
        from worker.types import CanvasEvent, DoneEvent, EngineRequest, ErrorEvent, StepEvent

        engine = self.engine
        self.counter += 1
        runner, thread = self._publisher(reqs) if self.redis_url else (None, None)
        queues: dict[int, list[Req]] = {}
        for r in reqs:
            queues.setdefault(r.client, []).append(r)
        open_: dict[str, tuple[Record, float]] = {}
        records: list[Record] = []
        progress = _progress(label, len(reqs), quiet)
        import threading

        tid = threading.get_native_id()
        cpu0, (run0, runq0) = time.thread_time(), schedstat(os.getpid(), tid)
        t0 = time.perf_counter()

        def send(client: int, now: float) -> None:
            if not queues[client]:
                return
            r = queues[client].pop(0)
            rec = Record(r.client, r.index, r.ref, r.seed, sent_s=now - t0, prompt_tokens=len(r.prompt_ids))
            records.append(rec)
            rid = f"{r.ref}.{self.counter}"
            open_[rid] = (rec, now)
            engine.add(EngineRequest(rid, r.prompt_ids, engine_params(self.served, r)))

        for c in list(queues):
            send(c, t0)
        while engine.has_work():
            started = time.perf_counter()
            n_rows = engine.active + len(engine.pending)
            events = engine.step()
            now = time.perf_counter()
            if runner is not None and events:
                runner.outbox.put(events)
            if record_steps:
                self.step_ms.append((now - started) * 1e3)
                self.rows.append(min(n_rows, engine.config.max_batch))
            for ev in events:
                rec, sent = open_[ev.request_id]
                t = now - sent
                if isinstance(ev, StepEvent):
                    rec.on_step(t, ev.canvas, ev.step)
                    if len(self.capture) < 64:
                        self.capture.append(ev)
                elif isinstance(ev, CanvasEvent):
                    rec.on_canvas(t)
                elif isinstance(ev, DoneEvent | ErrorEvent):
                    rec.e2e_s = t
                    if isinstance(ev, DoneEvent):
                        rec.token_ids, rec.completion_tokens = list(ev.token_ids), len(ev.token_ids)
                        rec.steps_expected, rec.finish_reason = ev.denoising_steps, ev.finish_reason
                    else:
                        rec.error = f"{ev.code}: {ev.message}"[:300]
                    del open_[ev.request_id]
                    progress(rec)
                    send(rec.client, now)
        wall = time.perf_counter() - t0
        if record_steps:
            self.thread_cpu_s += time.thread_time() - cpu0
            run1, runq1 = schedstat(os.getpid(), tid)
            self.last_run_info = run_info(wall, run1 - run0, runq1 - runq0) if run1 else {}
            self.sched[0] += wall
            self.sched[1] += run1 - run0
            self.sched[2] += runq1 - runq0
        if runner is not None:
            runner.outbox.put(None)
            thread.join(timeout=60)
            if record_steps:
                self.publisher_tail_s.append(time.perf_counter() - t0 - wall)
            runner.redis.close()
        return sorted(records, key=lambda r: (r.client, r.index)), wall

    def extra(self, wall_s: float, records: list[Record]) -> dict:
        e = self.engine
        out: dict = {"device": str(e.device), "decode_mode": e.decode_mode, "sampler": e.sampler_mode}
        if self.redis_url:
            out["diagnostic"] = ("the engine in this process with the worker's real publisher thread beside it "
                                 "(detokenise, encode, XADD to the service's Redis); no gateway, no clients")
            out["publisher_tail_s"] = [round(x, 4) for x in self.publisher_tail_s]
            if self.write_ms:
                out["publisher"] = {"batches": len(self.write_ms),
                                    "convert_ms_mean": round(statistics.fmean(self.convert_ms), 3),
                                    "write_ms_mean": round(statistics.fmean(self.write_ms), 3),
                                    "busy_s": round((sum(self.convert_ms) + sum(self.write_ms)) / 1e3, 3)}
        if self.step_ms:
            out["engine"] = {"steps": len(self.step_ms), "mean_rows": round(statistics.fmean(self.rows), 2),
                             "step_time_ms_mean": round(statistics.fmean(self.step_ms), 3),
                             "step_time_ms_p50": round(pct(self.step_ms, 0.5), 3),
                             "engine_busy_s": round(sum(self.step_ms) / 1e3, 3),
                             "engine_busy_share_of_wall": round(sum(self.step_ms) / 1e3 / wall_s, 3),
                             "engine_thread_cpu_s": round(self.thread_cpu_s, 3),
                             "engine_thread_on_cpu_share_of_busy": round(self.thread_cpu_s / (sum(self.step_ms) / 1e3),
                                                                         3)}
            if self.sched[1]:
                out["engine"]["engine_thread_schedstat"] = thread_time_split(*self.sched)
        if self.args.breakdown and not self.redis_url:
            out["python_costs"] = python_costs(self.tokenizer, self.capture,
                                               max(1, min(self.args.max_batch, self.args.clients)))
        return out

    def close(self) -> None:
        pass


def engine_params(served, r: Req):
    """The gateway's resolution of a request's sampling parameters (checkpoint defaults + what was sent)."""
    from worker.types import SamplingParams

    d = {**served.defaults, "max_new_tokens": r.max_new_tokens, "max_denoising_steps": r.steps}
    return SamplingParams(seed=r.seed, eos_token_ids=tuple(served.eos_token_ids), **d)


def python_costs(tokenizer, steps: list, batch: int) -> dict:
    """What the layers above the engine do per step event, timed here, one core, no contention."""
    from protocol import contract
    from worker.text import Detokenizer

    if not steps:
        return {}
    detok = Detokenizer(tokenizer)
    n, m = 2000, len(steps)

    def per_event_us(fn) -> float:
        t = time.perf_counter()
        for i in range(n):
            fn(i % m)
        return round((time.perf_counter() - t) / n * 1e6, 2)

    raws = [contract.encode(detok.convert(s)) for s in steps]
    return {
        "worker_decode_draft_us": per_event_us(lambda i: detok.decode(steps[i].draft_ids)),
        "worker_convert_and_encode_us": per_event_us(lambda i: contract.encode(detok.convert(steps[i]))),
        "gateway_decode_and_reencode_us": per_event_us(lambda i: contract.decode_event(raws[i]).model_dump_json()),
        "client_json_loads_us": per_event_us(lambda i: json.loads(raws[i])),
        "step_event_bytes": round(statistics.fmean(len(r) for r in raws)),
        "rows_per_step": batch,
    }


# ------------------------------------------------------------------ compare, output
def same_tokens(records: dict[str, list[Record]]) -> dict:
    """Every run of every mode against the engine's first run (or the first mode's), request by request."""
    runs = {(m, r.run) for m, recs in records.items() for r in recs}
    ref_mode = "engine" if "engine" in records else next(iter(records))
    reference = {r.ref: r.token_ids for r in records[ref_mode] if r.run == 0 and r.error is None}
    compared, mismatched = 0, []
    for mode, recs in records.items():
        for r in recs:
            if r.error is None and r.ref in reference and not (mode == ref_mode and r.run == 0):
                compared += 1
                if r.token_ids != reference[r.ref]:
                    mismatched.append(f"{mode}#{r.run}:{r.ref}")
    return {"reference": f"{ref_mode} run 0", "runs": len(runs), "compared": compared,
            "identical": compared - len(mismatched), "mismatched": mismatched,
            "all_identical": compared > 0 and not mismatched}


def ratios(svc: dict, eng: dict) -> dict:
    def inv(key: str, q: str = "p50") -> float | None:
        s, e = svc[key].get(q), eng[key].get(q)
        return round(e / s, 3) if s and e else None

    pairs = [round(s["tok_s"] / e["tok_s"], 3) for s, e in zip(svc["runs"], eng["runs"], strict=False) if e["tok_s"]]
    return {"tok_s_service_over_engine": round(svc["tok_s"] / eng["tok_s"], 3) if eng["tok_s"] else None,
            "tok_s_service_over_engine_per_run": pairs,
            "e2e_p50_engine_over_service": inv("e2e_s"),
            "e2e_p99_engine_over_service": inv("e2e_s", "p99"),
            "first_step_p50_engine_over_service": inv("first_step_s"),
            "step_interval_p50_engine_over_service": inv("step_interval_s"),
            "goal": 0.85}


def analyse(out: dict) -> list[str]:
    """Where the service's time goes, in numbers (printed, and kept in the JSON)."""
    svc, eng = out["modes"].get("service"), out["modes"].get("engine")
    if not svc or not eng:
        return []
    notes = []
    busy = [f"{m} run {i + 1} ({r['engine_thread_waiting_for_a_core_share'] * 100:.0f}%)"
            for m, s in out["modes"].items() for i, r in enumerate(s["runs"])
            if r.get("engine_thread_waiting_for_a_core_share", 0) > 0.1]
    if busy:
        notes.append("the engine loop's thread waited for a core during " + ", ".join(busy) + " (share of the "
                     "run): other runnable threads outnumbered the cores, the service's own (gateway, Redis, clients, "
                     "worker threads) or, in the engine modes necessarily, other work on the machine; ratios from "
                     "such engine runs are unreliable")
    w, e = svc.get("worker"), eng.get("engine")
    if w and e:
        notes.append(
            f"engine steps: in the service {w['steps']} steps of {w['mean_rows']} rows, {w['step_time_ms_mean']} ms "
            f"each (busy {w['engine_busy_s']}s = {w['engine_busy_share_of_wall'] * 100:.0f}% of {svc['wall_s']}s); "
            f"bare engine {e['steps']} steps of {e['mean_rows']} rows, {e['step_time_ms_mean']} ms each (busy "
            f"{e['engine_busy_s']}s = {e['engine_busy_share_of_wall'] * 100:.0f}% of {eng['wall_s']}s)")
        notes.append(f"a step inside the service takes {w['step_time_ms_mean'] / e['step_time_ms_mean']:.2f}x the "
                     "bare engine's; per row "
                     f"{(w['step_time_ms_mean'] / w['mean_rows']) / (e['step_time_ms_mean'] / e['mean_rows']):.2f}x; "
                     f"the service ran {w['steps'] / e['steps']:.3f}x as many steps (requests reach the engine one "
                     "by one, not together)")
        if "engine_thread_on_cpu_share_of_busy" in w:
            share = w["engine_thread_on_cpu_share_of_busy"]
            bare = e["engine_thread_on_cpu_share_of_busy"]
            notes.append(f"the engine loop's thread was on a CPU for {share * 100:.0f}% of its step time in the worker "
                         f"vs {bare * 100:.0f}% in the bare engine (the rest: waiting for the GIL or for a core)")
    cpu = svc.get("cpu")
    if cpu:
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in cpu["cpu_s"].items())
        notes.append(f"CPU while the service ran ({cpu['wall_s']}s wall, {cpu['cores']} cores): {parts}; "
                     f"{cpu['utilisation_of_all_cores'] * 100:.0f}% of all cores busy")
    diag = out["modes"].get("engine+publisher", {}).get("engine")
    if diag and e:
        notes.append(f"the worker's publisher thread alone (engine+publisher, same process, no gateway/clients): "
                     f"{diag['step_time_ms_mean']} ms per step vs {e['step_time_ms_mean']} ms bare "
                     f"({diag['step_time_ms_mean'] / e['step_time_ms_mean']:.2f}x), tok/s "
                     f"{out['modes']['engine+publisher']['tok_s']} vs {eng['tok_s']} "
                     f"({out['modes']['engine+publisher']['tok_s'] / eng['tok_s']:.2f}x); its engine thread on a CPU "
                     f"{diag['engine_thread_on_cpu_share_of_busy'] * 100:.0f}% of its step time")
    pc, rc = eng.get("python_costs"), svc.get("redis_costs")
    pub = out["modes"].get("engine+publisher", {}).get("publisher")
    if pc and rc and e:
        b = pc["rows_per_step"]
        gw = b * (pc["gateway_decode_and_reencode_us"] / 1e3 + rc["gateway_xread_ms_per_call"])
        conv = b * pc["worker_convert_and_encode_us"] / 1e3
        dec = b * pc["worker_decode_draft_us"] / 1e3
        text = (f"per step of {b} rows, timed alone: detokenise + encode {conv:.2f} ms (tokenizer.decode {dec:.2f} "
                f"ms of it), gateway >= {gw:.2f} ms (an XREAD + decode + re-encode per event, before WebSocket "
                f"framing), clients "
                f"{b * pc['client_json_loads_us'] / 1e3:.2f} ms (json.loads)")
        if pub:
            text += (f"; the publisher thread beside the engine: convert {pub['convert_ms_mean']} ms + Redis script "
                     f"{pub['write_ms_mean']} ms per step")
        notes.append(text + f"; the bare engine step: {e['step_time_ms_mean']} ms")
    return notes


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def write_json(out: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


def plot(out: dict, records: dict[str, list[Record]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"service": "#2a7", "engine": "#666", "engine+publisher": "#d93"}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))

    def cdf(ax, key: str, title: str) -> None:
        for mode, recs in records.items():
            ok = [r for r in recs if r.error is None]
            v = sorted(g for r in ok for g in r.step_gaps_s) if key == "step_interval_s" else sorted(
                getattr(r, key) for r in ok if getattr(r, key) is not None)
            if v:
                ax.step([x * 1e3 for x in v], [(i + 1) / len(v) for i in range(len(v))], where="post",
                        color=colors.get(mode), label=f"{mode} (p50 {pct(v, 0.5) * 1e3:.0f} ms)")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of step gaps" if key == "step_interval_s" else "fraction of requests")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    cdf(axes[0], "first_step_s", "time to first step event")
    cdf(axes[1], "step_interval_s", "interval between step events")
    cdf(axes[2], "e2e_s", "end-to-end latency")
    modes = list(out["modes"])
    axes[3].bar(modes, [out["modes"][m]["tok_s"] for m in modes], color=[colors.get(m) for m in modes])
    for i, m in enumerate(modes):
        runs = [x["tok_s"] for x in out["modes"][m]["runs"]]
        axes[3].scatter([i] * len(runs), runs, color="k", s=12, zorder=3)
    axes[3].set_ylabel("output tokens / s (dots: single runs)")
    r = out.get("ratios", {}).get("tok_s_service_over_engine")
    axes[3].set_title(f"throughput: service / engine = {r}" if r is not None else "throughput", fontsize=10)
    s = out["settings"]
    fig.suptitle(f"dgserve, full service (every step streamed over WebSocket) vs in-process engine: {s['clients']} "
                 f"clients x {s['requests_per_client']} requests x {s['repeats']} runs, {s['prompt_tokens']}-token "
                 f"prompts, {s['max_new_tokens']} new tokens, {s['steps']} steps/canvas, max_batch {s['max_batch']}"
                 f"\n{out['checkpoint_kind']}; {out['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}", flush=True)


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["service", "engine"], default="service", help="what to run with --no-compare")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="run both modes, interleaved, and report service/engine (default on)")
    p.add_argument("--checkpoint", help="default: models/text if it exists, else an untrained one built here")
    p.add_argument("--url", help="use this running service (http://host:port) instead of starting one")
    p.add_argument("--model", help="with --url: the served model name (default: the gateway's default)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, help="default: 2 canvases")
    p.add_argument("--steps", type=int, help="max_denoising_steps (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2,
                   help="measured runs of the workload per mode, the modes alternating (ABBA...); pooled")
    p.add_argument("--max-batch", type=int, default=8, help="the worker's DG_MAX_BATCH and the engine's max_batch")
    p.add_argument("--max-context", type=int, default=2048, help="the worker's DG_MAX_CONTEXT, likewise")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="the worker's DG_TORCH_THREADS and the engine's (0: all cores, as `dgserve up` with one "
                        "model). Default 1: with as many OpenMP threads as cores, a step stalls (10x and more) "
                        "whenever the gateway, Redis, the clients or anything else takes a core")
    p.add_argument("--device", default="cpu", help="the worker's and the engine's device")
    p.add_argument("--ws-compression", choices=["deflate", "none"], default="deflate",
                   help="permessage-deflate (what browsers and the websockets library negotiate) or none")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests per mode before the measured runs")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a client waits for an event")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the per-event work of publisher, gateway and client, and Redis round trips")
    p.add_argument("--diagnose", action=argparse.BooleanOptionalAction, default=True,
                   help="with --compare and a service started here: also run (once) the engine with the worker's "
                        "real publisher thread beside it (mode engine+publisher), to separate the worker's overhead")
    p.add_argument("--out", type=Path, help="JSON path (PNG next to it); default bench/results/serve_<device>.json")
    args = p.parse_args(argv)
    if args.compare and args.url and not args.checkpoint:
        p.error("--compare with --url needs --checkpoint (the served model, for the engine mode)")
    args.torch_threads = args.torch_threads or os.cpu_count() or 1
    args.out = args.out or RESULTS / f"serve_{'cpu' if args.device == 'cpu' else 'gpu'}.json"

    from service.registry import load_model as load_served

    checkpoint, kind = resolve_checkpoint(args)
    model_name = "bench"
    served = load_served(model_name, checkpoint)  # exactly the gateway's tokenizer and sampling defaults
    args.max_new_tokens = args.max_new_tokens or 2 * served.canvas_length
    args.steps = args.steps or int(served.defaults["max_denoising_steps"])
    reqs = build_workload(served, args)
    lengths = sorted({len(r.prompt_ids) for r in reqs})
    print(f"workload: {args.clients} clients x {args.requests_per_client} requests x {args.repeats} runs per mode, "
          f"prompts of {lengths} tokens, max_new_tokens {args.max_new_tokens} (canvas {served.canvas_length}), "
          f"{args.steps} steps/canvas; checkpoint {checkpoint} [{kind}]", flush=True)

    modes = ["service", "engine"] if args.compare else [args.mode]
    harness: dict = {}
    try:
        for mode in list(modes):
            harness[mode] = (ServiceMode(args, model_name, checkpoint) if mode == "service"
                             else EngineMode(args, served, checkpoint))
            if args.warmup:
                harness[mode].warm(warmup_workload(reqs, args.warmup))
        if args.compare and args.diagnose and harness["service"].svc is not None:
            mode = "engine+publisher"
            try:
                harness[mode] = EngineMode(args, served, checkpoint, base=harness["engine"],
                                           redis_url=harness["service"].svc.redis.url)
                harness[mode].warm(warmup_workload(reqs, max(1, args.warmup)))
                modes.append(mode)
            except Exception as exc:  # noqa: BLE001 (it leans on the runner's internals: report, go on)
                harness.pop(mode, None)
                print(f"diagnostic mode {mode} unavailable: {exc!r}", flush=True)
        records: dict[str, list[Record]] = {m: [] for m in modes}
        walls: dict[str, list[tuple[float, int]]] = {m: [] for m in modes}
        infos: dict[str, list[dict]] = {m: [] for m in modes}
        for i in range(args.repeats):
            for mode in (modes if i % 2 == 0 else modes[::-1]):
                if mode == "engine+publisher" and i > 0:
                    continue  # a diagnostic: one run is enough
                time.sleep(0.3)  # let the other mode's threads go quiet
                print(f"run {i + 1}/{args.repeats}, {mode}: {len(reqs)} requests from {args.clients} clients ...",
                      flush=True)
                recs, wall = harness[mode].run(reqs, f"{mode} #{i + 1}")
                for r in recs:
                    r.run = i
                records[mode] += recs
                walls[mode].append((wall, sum(r.completion_tokens for r in recs if r.error is None)))
                info = dict(harness[mode].last_run_info)
                infos[mode].append(info)
                waited = info.get("engine_thread_waiting_for_a_core_share")
                print(f"  -> {walls[mode][-1][1]} tokens in {wall:.3f}s = {walls[mode][-1][1] / wall:.1f} tok/s"
                      + (f"; the engine loop's thread waited for a core {waited * 100:.0f}% of the run"
                         if waited is not None else ""), flush=True)
        out: dict = {"benchmark": "serve", "checkpoint": checkpoint, "checkpoint_kind": kind,
                     "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                  if k != "out"} | {"canvas_length": served.canvas_length,
                                                    "sampling_defaults": served.defaults,
                                                    "eos_token_ids": list(served.eos_token_ids)},
                     "modes": {}}
        for mode in modes:
            wall = sum(w for w, _ in walls[mode])
            out["modes"][mode] = summarize(mode, records[mode], walls[mode],
                                           harness[mode].extra(wall, records[mode]))
            for run, info in zip(out["modes"][mode]["runs"], infos[mode], strict=True):
                run.update(info)
    finally:
        for h in harness.values():
            h.close()

    for mode in modes:
        print_summary(out["modes"][mode])
    out["device"] = device_name(args.device)
    import torch

    out["torch"] = torch.__version__
    if "service" in records and "engine" in records:
        out["ratios"] = ratios(out["modes"]["service"], out["modes"]["engine"])
    out["same_tokens"] = same_tokens(records)
    if "service" in records:  # the gateway tokenised each prompt into exactly the ids the engine mode was given
        lengths_by_ref = {r.ref: len(r.prompt_ids) for r in reqs}
        out["prompt_tokens_agree"] = all(r.prompt_tokens in (None, lengths_by_ref[r.ref]) for r in records["service"])
        if not out["prompt_tokens_agree"]:
            print("WARNING: the service tokenised the prompts differently from --checkpoint's tokenizer: is it "
                  "serving that checkpoint (--url, --model)?", flush=True)
    out["analysis"] = analyse(out)
    out["requests"] = {mode: [r.raw() for r in recs] for mode, recs in records.items()}
    write_json(out, args.out)
    print(f"wrote {args.out}", flush=True)
    plot(out, records, args.out.with_suffix(".png"))
    print_final(out)
    return 0


def _fmt(d: dict) -> str:
    if not d.get("n"):
        return f"{'-':>8s} {'-':>8s} {'-':>8s}"
    return f"{d['p50'] * 1e3:8.1f} {d['p90'] * 1e3:8.1f} {d['p99'] * 1e3:8.1f}"


def print_summary(s: dict) -> None:
    se = s["step_events"]
    print(f"\n[{s['name']}] {s['completed']}/{s['requests']} ok, errors {s['errors'] or 'none'}, "
          f"{s['completion_tokens']} tokens in {s['wall_s']:.2f}s = {s['tok_s']:.1f} tok/s (runs: "
          f"{', '.join(str(r['tok_s']) for r in s['runs'])}); step events {se['received']}/{se['expected']} "
          f"(missing {se['missing']})", flush=True)
    print(f"  {'ms':16s} {'p50':>8s} {'p90':>8s} {'p99':>8s}", flush=True)
    for key in METRICS:
        print(f"  {key:16s} {_fmt(s[key])}", flush=True)


def print_final(out: dict) -> None:
    r = out.get("ratios")
    if r:
        print(f"\nservice/engine tok/s = {r['tok_s_service_over_engine']} "
              f"(per run {r['tok_s_service_over_engine_per_run']}; goal >= {r['goal']}); "
              f"p50 e2e engine/service = {r['e2e_p50_engine_over_service']}; "
              f"p50 first step engine/service = {r['first_step_p50_engine_over_service']}", flush=True)
    st = out["same_tokens"]
    print(f"same tokens for the same requests ({st['runs']} runs vs {st['reference']}): "
          f"{st['identical']}/{st['compared']}{'' if st['all_identical'] else ' MISMATCH: ' + str(st['mismatched'])}",
          flush=True)
    for line in out.get("analysis", []):
        print(f"  - {line}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
