"""Engine benchmark: our continuous-batching engine against transformers' generate(), same requests,
one run, one machine. Prints ratios measured side by side and writes JSON + a PNG to bench/results/.

CPU, small checkpoint (issue 3):
    python bench/engine.py --checkpoint models/text
  16 requests, prompts of 16..512 tokens, 1..4 canvases each, arriving over a short window:
  (a) generate() one request at a time, (b) generate() with all requests in one static batch,
  (c) our engine with the staggered arrivals. Reports tok/s, latency p50/p99, c/a and c/b.

GPU, the real 26B-A4B architecture at random weights (fixed 16 steps: random weights never stop early):
    python bench/engine.py --realscale [--scale tiny]
  1024 prompt / 1024 new tokens at 1, 4, 16, 32 concurrent requests (and 64 for ours), ours vs generate().
    --quantization int4                     weight-only int4 text layers (the 24 GB mode), built layer by layer
  Ours runs its own layer forward (worker/ops); generate() runs transformers' modules with their default experts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.step_cost import init_random  # noqa: E402
from protocol import contract  # noqa: E402
from worker.device import device_name  # noqa: E402
from worker.engine import Engine, EngineConfig  # noqa: E402
from worker.types import DoneEvent, EngineRequest, ErrorEvent, SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Request:
    rid: str
    prompt: list[int]
    max_new_tokens: int
    arrival: float  # seconds after the start of the run
    seed: int


@dataclass
class RunResult:
    name: str
    makespan_s: float
    tokens: int
    latencies_s: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.makespan_s if self.makespan_s > 0 else 0.0

    def summary(self) -> dict:
        lat = sorted(self.latencies_s)
        pct = (lambda q: lat[min(len(lat) - 1, math.ceil(q * len(lat)) - 1)]) if lat else (lambda q: 0.0)
        return {"name": self.name, "tok_s": round(self.tok_s, 2), "tokens": self.tokens,
                "makespan_s": round(self.makespan_s, 3), "latency_p50_s": round(statistics.median(lat), 3) if lat
                else None, "latency_p99_s": round(pct(0.99), 3), "latency_max_s": round(max(lat), 3) if lat
                else None, **self.extra}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ models
def load_checkpoint(path: str, device: str):
    from worker.loading import load_model

    model, tokenizer = load_model(path, device=device)
    return model, tokenizer


def _materialise_quantized(model, device: torch.device, generator: torch.Generator, kind: str) -> None:
    """Materialise a meta-device model one text layer at a time, quantizing each before the next exists, so peak
    memory stays at the quantized size. Encoder and decoder layers share their weights (as in the checkpoint)."""
    from tqdm.auto import tqdm

    from worker.quantize import quantize_model

    text = model.model.encoder.language_model
    decoder_layers, encoder_layers = model.model.decoder.layers, text.layers
    model.model.decoder.layers, text.layers = torch.nn.ModuleList(), torch.nn.ModuleList()
    model.to_empty(device=device)  # everything but the layers: embeddings, norms, vision stub
    init_random(model, device, generator)
    for dec, enc in tqdm(list(zip(decoder_layers, encoder_layers, strict=True)), desc=f"layers -> {kind}",
                         unit="layer"):
        dec.to_empty(device=device)
        init_random(dec, device, generator)
        quantize_model(dec, kind, prefix="")
        for name, mod in dec.named_modules():  # the encoder layer uses the same (quantized) weights
            target = enc.get_submodule(name)
            for pname, param in mod.named_parameters(recurse=False):
                setattr(target, pname, param)
            for bname, buf in mod.named_buffers(recurse=False):
                if target._buffers.get(bname) is not None or bname.endswith("_fp8_scale"):  # fp8: new buffers
                    target._buffers[bname] = buf
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model.model.decoder.layers, text.layers = decoder_layers, encoder_layers
    model.set_experts_implementation("eager")


def build_realscale(scale: str, device: torch.device, quantization: str = "none"):
    """The 26B-A4B architecture (or a tiny copy of it) with random weights, materialised in seconds; with
    `quantization`, each text layer is quantized as soon as it exists (peak memory: the quantized model)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, Gemma4VisionConfig

    from worker.quantize import weight_bytes

    text = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                num_attention_heads=16, num_key_value_heads=8, num_global_key_value_heads=2, head_dim=256,
                global_head_dim=512, moe_intermediate_size=704, num_experts=128, top_k_experts=8,
                sliding_window=1024, attention_k_eq_v=True, max_position_embeddings=262144)
    if scale == "tiny":
        text.update(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64,
                    moe_intermediate_size=64, num_experts=8, top_k_experts=2, sliding_window=64)
    vision = Gemma4VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=32).to_dict()
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=256)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.time()
    torch.set_default_dtype(dtype)
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(cfg)
    torch.set_default_dtype(torch.float32)
    g = torch.Generator(device=device).manual_seed(0)
    if quantization == "none":
        model = model.to_empty(device=device)
        init_random(model, device, g)
    else:
        _materialise_quantized(model, device, g, quantization)
    model.tie_weights()
    model.eval()
    model.generation_config.eos_token_id = None
    unique = {id(p): p for p in model.parameters()}.values()
    info = {"params": sum(p.numel() for p in unique), "param_bytes": weight_bytes(model),
            "quantization": quantization, "build_s": round(time.time() - started, 1),
            "experts_implementation": getattr(model.config.get_text_config(), "_experts_implementation", None),
            "attn_implementation": model.config._attn_implementation}
    if device.type == "cuda":
        info["build_peak_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    print(f"built realscale={scale}: {info['params'] / 1e9:.2f}B params, {info['param_bytes'] / 1e9:.1f} GB "
          f"in {info['build_s']}s ({quantization} weights, {info['experts_implementation']} experts, "
          f"{info['attn_implementation']})", flush=True)
    return model, info


# --------------------------------------------------------------- workloads
def cpu_workload(vocab: int, n: int, window: float, canvas: int, seed: int) -> list[Request]:
    """n requests, prompts of 16..512 tokens, 1..4 canvases each, arrivals spread over `window` seconds."""
    rnd = random.Random(seed)
    lengths = [16, 32, 64, 128, 256, 512]
    out = []
    for i in range(n):
        plen = lengths[i % len(lengths)] if i < len(lengths) else rnd.randint(16, 512)
        prompt = [2] + [rnd.randrange(9, vocab) for _ in range(plen - 1)]
        out.append(Request(f"r{i}", prompt, canvas * (1 + i % 4), round(rnd.uniform(0, window), 3), 1000 + i))
    out.sort(key=lambda r: r.arrival)
    return out


def realscale_workload(concurrency: int, vocab: int, prompt_len: int, new_tokens: int, seed: int) -> list[Request]:
    rnd = random.Random(seed)
    return [Request(f"c{concurrency}-{i}", [2] + [rnd.randrange(9, vocab) for _ in range(prompt_len - 1)],
                    new_tokens, 0.0, seed + i) for i in range(concurrency)]


# ----------------------------------------------------------------- runners
def generate_kwargs(steps: int | None) -> dict:
    kw: dict = {"eos_token_id": None}
    if steps is not None:
        kw["max_denoising_steps"] = steps
    return kw


def wait_until(t0: float, at: float) -> None:
    delay = t0 + at - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


@torch.no_grad()  # not inference_mode: quantized (torchao) weights need version counters
def run_reference_sequential(model, reqs: list[Request], steps: int | None, device) -> RunResult:
    """(a) generate() one request at a time, in arrival order."""
    t0 = time.perf_counter()
    res = RunResult("reference, one at a time", 0, 0)
    for r in reqs:
        wait_until(t0, r.arrival)
        torch.manual_seed(r.seed)
        out = model.generate(torch.tensor([r.prompt], device=device), max_new_tokens=r.max_new_tokens,
                             **generate_kwargs(steps))
        sync(device)
        res.tokens += min(r.max_new_tokens, out.sequences.shape[1] - len(r.prompt))
        res.latencies_s.append(time.perf_counter() - t0 - r.arrival)
    res.makespan_s = time.perf_counter() - t0
    return res


@torch.no_grad()
def run_reference_static(model, reqs: list[Request], steps: int | None, device, pad_id: int = 0) -> RunResult:
    """(b) generate() with every request in one static batch: it starts when the last one has arrived,
    every row runs as many canvases as the longest, and all rows return together."""
    t0 = time.perf_counter()
    wait_until(t0, max(r.arrival for r in reqs))
    width = max(len(r.prompt) for r in reqs)
    ids = torch.full((len(reqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(reqs), width), dtype=torch.long)
    for i, r in enumerate(reqs):  # left padding
        ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
        mask[i, width - len(r.prompt):] = 1
    torch.manual_seed(reqs[0].seed)
    kwargs = {"attention_mask": mask.to(device)} if any(len(r.prompt) != width for r in reqs) else {}
    model.generate(ids.to(device), max_new_tokens=max(r.max_new_tokens for r in reqs), **kwargs,
                   **generate_kwargs(steps))
    sync(device)
    end = time.perf_counter() - t0
    res = RunResult("reference, one static batch", end, sum(r.max_new_tokens for r in reqs))
    res.latencies_s = [end - r.arrival for r in reqs]
    return res


def engine_params(r: Request, defaults: dict, steps: int | None) -> SamplingParams:
    return SamplingParams(max_new_tokens=r.max_new_tokens, seed=r.seed, eos_token_ids=(),
                          max_denoising_steps=steps or defaults["max_denoising_steps"],
                          entropy_bound=defaults["entropy_bound"], t_min=defaults["t_min"], t_max=defaults["t_max"],
                          stability_threshold=defaults["stability_threshold"],
                          confidence_threshold=defaults["confidence_threshold"])


def model_defaults(model) -> dict:
    return contract.sampling_defaults(model.generation_config)


def run_engine(engine: Engine, reqs: list[Request], steps: int | None, name: str) -> RunResult:
    """(c) our engine: requests join at their arrival times, leave when done."""
    defaults = model_defaults(engine.model)
    pending = sorted(reqs, key=lambda r: r.arrival)
    arrival = {r.rid: r.arrival for r in reqs}
    res = RunResult(name, 0, 0)
    t0 = time.perf_counter()
    batch_sizes = []
    while pending or engine.has_work():
        now = time.perf_counter() - t0
        while pending and pending[0].arrival <= now:
            r = pending.pop(0)
            engine.add(EngineRequest(r.rid, r.prompt, engine_params(r, defaults, steps)))
        if not engine.has_work():
            time.sleep(max(0.0, pending[0].arrival - now))
            continue
        batch_sizes.append(engine.active + len(engine.pending))
        for ev in engine.step():
            if isinstance(ev, DoneEvent):
                res.tokens += len(ev.token_ids)
                res.latencies_s.append(time.perf_counter() - t0 - arrival[ev.request_id])
            elif isinstance(ev, ErrorEvent):
                raise RuntimeError(f"{ev.request_id}: {ev.code} {ev.message}")
    res.makespan_s = time.perf_counter() - t0
    res.extra = {"mean_batch": round(statistics.mean(batch_sizes), 2) if batch_sizes else 0,
                 "max_batch": max(batch_sizes) if batch_sizes else 0, "steps": len(batch_sizes)}
    return res


def state_bytes_per_request(engine: Engine) -> dict:
    L, H = engine.canvas_length, engine.text_config.hidden_size
    dt = torch.finfo(engine.dtype).bits // 8
    per = {"kv_cache_bytes": engine.pool.bytes_per_row, "self_conditioning_bytes": L * H * dt,
           "canvas_and_draft_bytes": 2 * L * 8}
    per["total_bytes"] = sum(per.values())
    per["reference_self_conditioning_logits_bytes"] = L * engine.vocab_size * dt
    return per


# --------------------------------------------------------------------- main
def write(out: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


def cpu_main(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else "cpu")
    model, tokenizer = load_checkpoint(args.checkpoint, str(device))
    canvas = model.config.canvas_length
    reqs = cpu_workload(len(tokenizer), args.requests, args.window, canvas, args.seed)
    steps = args.steps
    lengths = [len(r.prompt) for r in reqs]
    print(f"workload: {len(reqs)} requests, prompts {min(lengths)}..{max(lengths)} tokens, "
          f"{sum(r.max_new_tokens for r in reqs)} new tokens, arrivals over {args.window}s", flush=True)
    max_ctx = max(len(r.prompt) + r.max_new_tokens for r in reqs) + canvas
    engine = Engine(model, EngineConfig(max_batch=len(reqs), max_context=max_ctx, decode_mode=args.decode_mode,
                                        sampler=args.sampler))
    run_engine(engine, reqs[:2], steps, "warm-up")  # first-call costs out of every measurement
    results = {}
    for key, fn in (("c", lambda: run_engine(engine, reqs, steps, "ours, continuous batching")),
                    ("a", lambda: run_reference_sequential(model, reqs, steps, device)),
                    ("b", lambda: run_reference_static(model, reqs, steps, device))):
        print(f"running ({key}) ...", flush=True)
        results[key] = fn()
        print(f"  {results[key].summary()}", flush=True)
    out = {"benchmark": "engine-cpu", "checkpoint": args.checkpoint, "device": device_name(device),
           "torch": torch.__version__, "requests": [asdict(r) | {"prompt": len(r.prompt)} for r in reqs],
           "steps": steps or model_defaults(model)["max_denoising_steps"],
           "runs": {k: v.summary() for k, v in results.items()},
           "ratios": {"c/a": round(results["c"].tok_s / results["a"].tok_s, 2),
                      "c/b": round(results["c"].tok_s / results["b"].tok_s, 2)},
           "latency_ratios_p50": {"a/c": round(statistics.median(results["a"].latencies_s) /
                                               statistics.median(results["c"].latencies_s), 2),
                                  "b/c": round(statistics.median(results["b"].latencies_s) /
                                               statistics.median(results["c"].latencies_s), 2)}}
    print(f"\nours/sequential c/a = {out['ratios']['c/a']}x, ours/static c/b = {out['ratios']['c/b']}x "
          f"(tok/s {results['c'].tok_s:.0f} vs {results['a'].tok_s:.0f} vs {results['b'].tok_s:.0f})", flush=True)
    plot_cpu(out, results, args.out.with_suffix(".png"))
    return out


def realscale_main(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    started = time.time()
    model, info = build_realscale(args.scale, device, args.quantization)
    vocab = model.config.get_text_config().vocab_size
    tiny = args.scale == "tiny"
    prompt_len, new_tokens, steps = (64, 256, 4) if tiny and device.type == "cpu" else (1024, 1024, 16)
    prompt_len, new_tokens = args.prompt_tokens or prompt_len, args.new_tokens or new_tokens
    out = {"benchmark": "engine-realscale", "scale": args.scale, "device": device_name(device),
           "torch": torch.__version__, "model": info, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
           "steps_per_canvas": steps, "reference": {}, "ours": {}, "ratios": {}, "notes": []}
    path = args.out

    def budget_left() -> float:
        return args.budget_s - (time.time() - started)

    # the reference first (its peak memory is the larger), then ours on the same model
    for c in args.ref_concurrency:
        if budget_left() < 60:
            out["notes"].append(f"reference at {c} skipped: time budget")
            continue
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            reqs = realscale_workload(c, vocab, prompt_len, new_tokens, args.seed)
            if not out["reference"]:  # warm-up: one canvas at batch 1
                run_reference_sequential(model, [Request("w", reqs[0].prompt, 256, 0, 0)], steps, device)
            res = run_reference_static(model, reqs, steps, device)
            s = res.summary()
            if device.type == "cuda":
                s["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
            out["reference"][str(c)] = s
            print(f"reference generate() at {c}: {s}", flush=True)
        except Exception as exc:  # noqa: BLE001 (recorded, and the run goes on)
            out["reference"][str(c)] = {"error": repr(exc)[:400]}
            print(f"reference at {c} failed: {exc!r}"[:400], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write(out, path)

    max_c = max(args.concurrency)
    for mode in args.modes:
        decode_mode, sampler = mode.split("+")
        key = mode
        if args.quantization in ("int4", "int8"):  # torchao tensors run the plain-torch ops: nothing to capture
            decode_mode = decode_mode.replace("graphs", "eager")
        try:
            t = time.time()
            engine = Engine(model, EngineConfig(max_batch=max_c, max_context=prompt_len + new_tokens + 256,
                                                decode_mode=decode_mode, sampler=sampler,
                                                sample_chunk_rows=args.chunk_rows))
            out["ours"][key] = {"setup_s": round(time.time() - t, 1), "decode_mode": engine.decode_mode,
                                "sampler": engine.sampler_mode, "state_per_request": state_bytes_per_request(engine),
                                "startup_s": round(info["build_s"] + time.time() - t, 1)}
            print(f"engine {key}: set up in {time.time() - t:.1f}s; state per request "
                  f"{out['ours'][key]['state_per_request']}", flush=True)
            run_engine(engine, realscale_workload(1, vocab, prompt_len, 256, 7), steps, "warm-up")
        except Exception as exc:  # noqa: BLE001
            out["ours"][key] = {"error": repr(exc)[:400]}
            print(f"engine {key} failed to start: {exc!r}"[:400], flush=True)
            continue
        for c in args.concurrency:
            if budget_left() < 45:
                out["notes"].append(f"ours {key} at {c} skipped: time budget")
                continue
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                res = run_engine(engine, realscale_workload(c, vocab, prompt_len, new_tokens, args.seed), steps,
                                 f"ours {key}")
                s = res.summary()
                if device.type == "cuda":
                    s["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
                    s["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
                out["ours"][key][str(c)] = s
                ref = out["reference"].get(str(c), {})
                if "tok_s" in ref:
                    out["ratios"][f"{key} @{c}"] = round(s["tok_s"] / ref["tok_s"], 2)
                print(f"ours {key} at {c}: {s}  ratio {out['ratios'].get(f'{key} @{c}')}", flush=True)
            except Exception as exc:  # noqa: BLE001
                out["ours"][key][str(c)] = {"error": repr(exc)[:400]}
                print(f"ours {key} at {c} failed: {exc!r}"[:400], flush=True)
            write(out, path)
        if args.profile_batch and budget_left() > 30:
            out["ours"][key]["profile"] = profile_steps(engine, vocab, prompt_len, args.profile_batch, steps, args.seed)
            if args.kernels:
                table = path.with_name(f"{path.stem}_{key.replace(' ', '_').replace('+', '_')}_kernels.txt")
                out["ours"][key]["kernels"] = kernel_table(engine, vocab, prompt_len, args.profile_batch, steps,
                                                           args.seed, table)
            print(f"profile {key} at {args.profile_batch}: {out['ours'][key]['profile']}", flush=True)
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write(out, path)
    plot_realscale(out, path.with_suffix(".png"))
    return out


def profile_steps(engine: Engine, vocab: int, prompt_len: int, batch: int, steps: int, seed: int) -> dict:
    """Where a step's time goes at `batch` rows (device syncs between phases)."""
    engine.profile = []
    reqs = realscale_workload(batch, vocab, prompt_len, 256, seed + 99)
    run_engine(engine, reqs, steps, "profile")
    laps = [p for p in engine.profile if p["rows"] == batch][1:] or engine.profile
    engine.profile = None
    keys = ("decoder_ms", "sampler_ms", "accept_ms")
    med = {k: round(statistics.median(p[k] for p in laps), 2) for k in keys}
    total = sum(med.values())
    return {**med, "rows": batch, "steps_measured": len(laps),
            "sampler_share": round(med["sampler_ms"] / total, 3) if total else None}


def kernel_table(engine: Engine, vocab: int, prompt_len: int, batch: int, steps: int, seed: int, path: Path) -> list:
    """Which kernels a canvas at `batch` rows spends its device time in (torch.profiler; graph replays show as
    one launch, so profile a `static` mode run to see the kernels of the same fixed-shape step)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    reqs = realscale_workload(batch, vocab, prompt_len, engine.canvas_length, seed + 77)
    with profile(activities=activities) as prof:
        run_engine(engine, reqs, steps, "kernels")
    key = "self_device_time_total" if engine.device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    rows = [{"name": e.key[:120], "calls": e.count, "ms": round(getattr(e, key) / 1e3, 2),
             "share": round(getattr(e, key) / total, 4)} for e in events[:40]]
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=40) + "\n")
    print(f"kernels at {batch} rows (top 10 of {len(events)}, by {key}); full table in {path}", flush=True)
    for r in rows[:10]:
        print(f"  {r['share']:6.1%} {r['ms']:10.2f} ms  x{r['calls']:<6} {r['name']}", flush=True)
    return rows


# ------------------------------------------------------------------- plots
def plot_cpu(out: dict, results: dict[str, RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = {"a": "generate()\none at a time", "b": "generate()\nstatic batch", "c": "ours\ncontinuous"}
    keys = ["a", "b", "c"]
    ax1.bar([names[k] for k in keys], [results[k].tok_s for k in keys], color=["#999", "#bbb", "#2a7"])
    ax1.set_ylabel("output tokens / s")
    ax1.set_title(f"c/a = {out['ratios']['c/a']}x, c/b = {out['ratios']['c/b']}x")
    for i, k in enumerate(keys):
        ax2.scatter([i] * len(results[k].latencies_s), results[k].latencies_s, alpha=0.6,
                    color=["#999", "#bbb", "#2a7"][i])
    ax2.set_xticks(range(3), [names[k] for k in keys])
    ax2.set_ylabel("request latency (s)")
    ax2.set_title("per-request latency")
    fig.suptitle(f"{out['benchmark']} on {out['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", flush=True)


def plot_realscale(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ref = {int(c): v["tok_s"] for c, v in out["reference"].items() if "tok_s" in v}
    if ref:
        ax.plot(list(ref), list(ref.values()), "o-", color="#999", label="transformers generate()")
    for key, runs in out["ours"].items():
        pts = {int(c): v["tok_s"] for c, v in runs.items() if c.isdigit() and "tok_s" in v}
        if pts:
            ax.plot(list(pts), list(pts.values()), "o-", label=f"ours ({key})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"DiffusionGemma {out['scale']} architecture, random weights, {out['steps_per_canvas']} steps/canvas\n"
                 f"{out['device']}", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="CPU mode: a small checkpoint directory")
    p.add_argument("--realscale", action="store_true", help="the 26B-A4B architecture at random weights")
    p.add_argument("--scale", default="real", choices=["real", "tiny"])
    p.add_argument("--device", default="auto")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--window", type=float, default=2.0, help="arrivals spread over this many seconds")
    p.add_argument("--steps", type=int, help="fixed denoising steps (default: the checkpoint's)")
    p.add_argument("--prompt-tokens", type=int, default=0, help="realscale prompt length (default 1024)")
    p.add_argument("--new-tokens", type=int, default=0, help="realscale new tokens per request (default 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode-mode", default="auto")
    p.add_argument("--sampler", default="auto")
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--concurrency", type=ints, default=[1, 4, 16, 32, 64])
    p.add_argument("--ref-concurrency", type=ints, default=[1, 4, 16, 32], help="empty: no reference runs")
    p.add_argument("--modes", type=lambda s: s.split(","), default=["graphs+fused"],
                   help="decode_mode+sampler pairs for ours, e.g. graphs+fused,eager+exact")
    p.add_argument("--quantization", default="none", choices=["none", "int4", "int8", "fp8"],
                   help="weight-only quantization of the text layers (worker/quantize.py), layer by layer as built")
    p.add_argument("--profile-batch", type=int, default=32)
    p.add_argument("--kernels", action="store_true",
                   help="also profile one canvas at --profile-batch rows with torch.profiler (kernel table)")
    p.add_argument("--chunk-rows", type=int, default=8)
    p.add_argument("--budget-s", type=float, default=480)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if bool(args.checkpoint) == bool(args.realscale):
        p.error("give exactly one of --checkpoint or --realscale")
    tag = "realscale" if args.realscale else "cpu"
    args.out = args.out or RESULTS / f"engine_{tag}.json"
    if args.realscale:
        if args.device == "cpu" or not torch.cuda.is_available():
            args.modes = [m.replace("graphs", "static").replace("fused", "exact") for m in args.modes]
        out = realscale_main(args)
    else:
        out = cpu_main(args)
    write(out, args.out)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
