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
bench/results/serve_cpu.{json,png} by default. The parts live in `bench/serving/` (workload, clients, the two
modes, the report); this file is the command.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.serving.engine import EngineMode  # noqa: E402
from bench.serving.report import (  # noqa: E402
    DIAGNOSTIC,
    analyse,
    plot,
    print_final,
    print_summary,
    ratios,
    same_tokens,
    summarize,
    write_json,
)
from bench.serving.service import ServiceMode  # noqa: E402
from bench.serving.workload import Record, Req, build_workload, resolve_checkpoint, warmup_workload  # noqa: E402
from worker.device import device_name  # noqa: E402

RESULTS = REPO / "bench" / "results"
MODEL_NAME = "bench"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    return args


@dataclass
class Runs:
    """Every measured run of every mode: the records, (wall seconds, tokens) and the run's thread figures."""

    modes: list[str]
    records: dict[str, list[Record]] = field(default_factory=dict)
    walls: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    infos: dict[str, list[dict]] = field(default_factory=dict)

    def add(self, mode: str, run: int, records: list[Record], wall: float, info: dict) -> None:
        for r in records:
            r.run = run
        self.records.setdefault(mode, []).extend(records)
        self.walls.setdefault(mode, []).append((wall, sum(r.completion_tokens for r in records if r.error is None)))
        self.infos.setdefault(mode, []).append(info)


def start_modes(args, served, checkpoint: str, reqs: list[Req], harness: dict) -> list[str]:
    """Start (and warm) each mode into `harness`; with --diagnose, the engine+publisher diagnostic too."""
    modes = ["service", "engine"] if args.compare else [args.mode]
    for mode in modes:
        harness[mode] = (ServiceMode(args, MODEL_NAME, checkpoint) if mode == "service"
                         else EngineMode(args, served, checkpoint))
        if args.warmup:
            harness[mode].warm(warmup_workload(reqs, args.warmup))
    if args.compare and args.diagnose and harness["service"].svc is not None:
        harness[DIAGNOSTIC] = EngineMode(args, served, checkpoint, base=harness["engine"],
                                         redis_url=harness["service"].svc.redis.url)
        harness[DIAGNOSTIC].warm(warmup_workload(reqs, max(1, args.warmup)))
        modes.append(DIAGNOSTIC)
    return modes


def run_modes(args, harness: dict, modes: list[str], reqs: list[Req]) -> Runs:
    """`--repeats` runs of the workload per mode, the modes alternating (the diagnostic once)."""
    runs = Runs(modes)
    for i in range(args.repeats):
        for mode in (modes if i % 2 == 0 else modes[::-1]):
            if mode == DIAGNOSTIC and i > 0:
                continue  # a diagnostic: one run is enough
            time.sleep(0.3)  # let the other mode's threads go quiet
            print(f"run {i + 1}/{args.repeats}, {mode}: {len(reqs)} requests from {args.clients} clients ...",
                  flush=True)
            recs, wall = harness[mode].run(reqs, f"{mode} #{i + 1}")
            info = dict(harness[mode].last_run_info)
            runs.add(mode, i, recs, wall, info)
            tokens = runs.walls[mode][-1][1]
            waited = info.get("engine_thread_waiting_for_a_core_share")
            print(f"  -> {tokens} tokens in {wall:.3f}s = {tokens / wall:.1f} tok/s"
                  + (f"; the engine loop's thread waited for a core {waited * 100:.0f}% of the run"
                     if waited is not None else ""), flush=True)
    return runs


def summaries(args, served, checkpoint: str, kind: str, harness: dict, runs: Runs) -> dict:
    out: dict = {"benchmark": "serve", "checkpoint": checkpoint, "checkpoint_kind": kind,
                 "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                              if k != "out"} | {"canvas_length": served.canvas_length,
                                                "sampling_defaults": served.defaults,
                                                "eos_token_ids": list(served.eos_token_ids)},
                 "modes": {}}
    for mode in runs.modes:
        wall = sum(w for w, _ in runs.walls[mode])
        out["modes"][mode] = summarize(mode, runs.records[mode], runs.walls[mode],
                                       harness[mode].extra(wall, runs.records[mode]))
        for run, info in zip(out["modes"][mode]["runs"], runs.infos[mode], strict=True):
            run.update(info)
    return out


def compare(out: dict, runs: Runs, reqs: list[Req], args) -> None:
    """Ratios, token agreement, the prompts' lengths as the service saw them, and where the time goes."""
    import torch

    records = runs.records
    out["device"] = device_name(args.device)
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


def main(argv: list[str] | None = None) -> int:
    from service.registry import load_model as load_served

    args = parse_args(argv)
    checkpoint, kind = resolve_checkpoint(args)
    served = load_served(MODEL_NAME, checkpoint)  # exactly the gateway's tokenizer and sampling defaults
    args.max_new_tokens = args.max_new_tokens or 2 * served.canvas_length
    args.steps = args.steps or int(served.defaults["max_denoising_steps"])
    reqs = build_workload(served, args)
    lengths = sorted({len(r.prompt_ids) for r in reqs})
    print(f"workload: {args.clients} clients x {args.requests_per_client} requests x {args.repeats} runs per mode, "
          f"prompts of {lengths} tokens, max_new_tokens {args.max_new_tokens} (canvas {served.canvas_length}), "
          f"{args.steps} steps/canvas; checkpoint {checkpoint} [{kind}]", flush=True)
    harness: dict = {}
    try:
        modes = start_modes(args, served, checkpoint, reqs, harness)
        runs = run_modes(args, harness, modes, reqs)
        out = summaries(args, served, checkpoint, kind, harness, runs)
    finally:
        for h in harness.values():
            h.close()
    for mode in runs.modes:
        print_summary(out["modes"][mode])
    compare(out, runs, reqs, args)
    write_json(out, args.out)
    print(f"wrote {args.out}", flush=True)
    plot(out, runs.records, args.out.with_suffix(".png"))
    print_final(out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
