"""GPU checks, run on the lent GPU by `scripts/gpu_run.sh check` (the CPU suite covers the same logic under
TRITON_INTERPRET and in the eager/static modes). Prints one table; writes JSON.

1. fused sampler: the Triton sampler against PyTorch at the real vocabulary (262144) in bf16, same logits and
   uniform draws: argmax, Gumbel-max samples, entropy, acceptance, soft probabilities; its time against the
   exact (reference-ops) sampler on 32 canvases of 256 positions;
2. forward: our layer forward at the real 26B-A4B shapes (2 layers: sliding + global) with the Triton kernels
   against the same forward with the plain-torch ops on the same GPU: one decoder step at 32 rows (hidden states,
   head argmax agreement, the K/V written into the pool) and chunked prompt encodes (the pool after them); the time
   of one 2-layer decoder step at 1 and 32 rows, Triton vs plain torch;
3. fp8: the same 2-layer model with block-scaled e4m3 weights (`DG_QUANTIZATION=fp8`) against bf16 on the same
   inputs: head argmax agreement, hidden-state error, and the step time;
4. engine: on a tiny copy of the architecture, CUDA-graph replay gives the same tokens as the same fixed-shape
   passes run without graphs, and the eager ones; rows batched together against alone.

    python scripts/gpu_checks.py OUT.json            # on a GPU
    python scripts/gpu_checks.py OUT.json --cpu      # the plumbing on the CPU (tiny shapes; no Triton)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker import fused, sampler  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_fused(results: dict, device: torch.device, small: bool) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    B, L, V = (2, 16, 4096) if small else (4, 256, 262144)
    logits = (torch.randn((B, L, V), generator=g, device=device) * 4).to(torch.bfloat16)
    hot = torch.randint(0, V, (B, L, 1), generator=g, device=device)
    logits.scatter_add_(-1, hot, (torch.rand((B, L, 1), generator=g, device=device) * 80).to(torch.bfloat16))
    inv_temp = torch.tensor([1 / 0.8, 1 / 0.6, 1 / 0.5, 1 / 0.41][:B], device=device)
    noise = torch.rand((B, L, V), generator=g, device=device)
    seeds = torch.zeros(B, dtype=torch.long, device=device)
    ours = fused.fused_stats(logits, inv_temp, seeds, 30.0, torch.bfloat16, noise=noise)
    ref = fused.reference_stats(logits, inv_temp, 30.0, torch.bfloat16, noise)
    probs = fused.fused_probs(logits, inv_temp, ours, 30.0, torch.bfloat16)
    bound = torch.full((B,), 0.1, device=device)
    results["fused_vs_pytorch"] = {
        "argmax_equal": bool(torch.equal(ours["argmax"], ref["argmax"])),
        "sample_equal": bool(torch.equal(ours["sample"], ref["sample"])),
        "entropy_max_abs_diff": float((ours["entropy"] - ref["entropy"]).abs().max()),
        "acceptance_equal": bool(torch.equal(sampler.entropy_bound_accept(ours["entropy"], bound),
                                             sampler.entropy_bound_accept(ref["entropy"], bound))),
        "probs_max_abs_diff": float((probs.float() - ref["probs"].float()).abs().max()),
    }


def _runner(model, ops, max_batch: int, max_context: int):
    from worker.model_runner import ModelRunner

    runner = ModelRunner(model, max_batch=max_batch, max_context=max_context)
    if ops is not None:
        runner.ops = ops
    return runner


def _timed(fn, device: torch.device, repeat: int = 3) -> float:
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return round((time.perf_counter() - t) / repeat * 1e3, 2)


@torch.inference_mode()
def check_forward(results: dict, device: torch.device, small: bool) -> None:
    from bench.step_cost import build, fill_pool, step_inputs
    from worker.model_runner import Block
    from worker.ops.registry import PLAIN
    from worker.ops.triton_kernels import register_cuda_kernels

    results["triton_ops_registered"] = register_cuda_kernels()  # idempotent: worker.ops did it at import
    model = build("tiny" if small else "real", 16384, device)
    rows, held = (4, 64) if small else (32, 1536)
    L = model.config.canvas_length
    H = model.config.text_config.hidden_size
    triton_runner = _runner(model, None, rows, 2304)
    plain_runner = _runner(model, SimpleNamespace(**PLAIN), rows, 2304)
    out = {}
    for runner in (triton_runner, plain_runner):  # the same cache in both pools
        g = torch.Generator(device=device).manual_seed(1)
        runner.pool.total[:rows] = [held] * rows
        fill_pool(runner.pool.keys, runner.pool.values, rows, g)
    canvas, soft = step_inputs(16384, rows, L, H, torch.Generator().manual_seed(2))
    canvas, soft = canvas.to(device), soft.to(device)
    hidden = {}
    for name, runner in (("triton", triton_runner), ("plain", plain_runner)):
        hidden[name] = runner.decode(canvas, soft).float()
    diff = (hidden["triton"] - hidden["plain"]).abs()
    head = model.lm_head.weight.float()
    agree = (hidden["triton"] @ head.T).argmax(-1) == (hidden["plain"] @ head.T).argmax(-1)
    out["decode_hidden_max_abs_diff"] = float(diff.max())
    out["decode_hidden_rel_diff"] = float(diff.norm() / hidden["plain"].norm())
    out["decode_head_argmax_agreement"] = float(agree.float().mean())
    out["decode_pool_max_abs_diff"] = max(
        float((a[:rows].float() - b[:rows].float()).abs().max())
        for a, b in zip(triton_runner.pool.keys + triton_runner.pool.values,
                        plain_runner.pool.keys + plain_runner.pool.values, strict=True))
    prompts = [list(range(5, 5 + n)) for n in ((300, 100, 20) if not small else (70, 33, 5))]
    for runner in (triton_runner, plain_runner):
        for s in range(3):
            runner.pool.release(s)
        runner.encode([0, 1, 2], prompts, "prompt")
    out["encode_pool_max_abs_diff"] = max(
        float((a[:3].float() - b[:3].float()).abs().max())
        for a, b in zip(triton_runner.pool.keys + triton_runner.pool.values,
                        plain_runner.pool.keys + plain_runner.pool.values, strict=True))
    for n in (1, rows):
        block = Block.empty(n, L, triton_runner.pool.kinds, device, (H, model.dtype))
        block.ids.copy_(canvas[:n])
        block.soft.copy_(soft[:n])
        triton_runner._fill(block, n, list(range(n)), [])
        for name, runner in (("triton", triton_runner), ("plain", plain_runner)):
            out[f"decode_2_layers_{n}_rows_ms_{name}"] = _timed(lambda r=runner, b=block: r.decoder_forward(b), device)
    results["forward_triton_vs_plain"] = out


@torch.inference_mode()
def check_fp8(results: dict, device: torch.device, small: bool) -> None:
    from bench.step_cost import build, fill_pool, step_inputs
    from worker.quantize import quantize_model

    model = build("tiny" if small else "real", 16384, device)
    rows, held = (4, 64) if small else (32, 1536)
    L, H = model.config.canvas_length, model.config.text_config.hidden_size
    canvas, soft = step_inputs(16384, rows, L, H, torch.Generator().manual_seed(2))
    canvas, soft = canvas.to(device), soft.to(device)
    out, hidden = {}, {}
    for kind in ("bf16", "fp8"):
        if kind == "fp8":
            quantize_model(model, "fp8")
        runner = _runner(model, None, rows, 2304)
        runner.pool.total[:rows] = [held] * rows
        fill_pool(runner.pool.keys, runner.pool.values, rows, torch.Generator(device=device).manual_seed(1))
        hidden[kind] = runner.decode(canvas, soft).float()
        out[f"decode_{rows}_rows_ms_{kind}"] = _timed(lambda r=runner: r.decode(canvas, soft), device)
        del runner
    head = model.lm_head.weight.float()
    agree = (hidden["fp8"] @ head.T).argmax(-1) == (hidden["bf16"] @ head.T).argmax(-1)
    out["head_argmax_agreement"] = float(agree.float().mean())
    out["hidden_rel_diff"] = float((hidden["fp8"] - hidden["bf16"]).norm() / hidden["bf16"].norm())
    results["fp8_vs_bf16"] = out


def check_engine(results: dict, device: torch.device, small: bool) -> None:
    from bench.engine import build_realscale
    from worker.engine import Engine, EngineConfig
    from worker.types import DoneEvent, EngineRequest, SamplingParams

    model, _ = build_realscale("tiny", device)

    def req(i: int, plen: int, new: int) -> EngineRequest:
        gen = torch.Generator().manual_seed(i)
        prompt = [2] + torch.randint(9, 4096, (plen - 1,), generator=gen).tolist()
        return EngineRequest(f"r{i}", prompt, SamplingParams(
            max_new_tokens=new, max_denoising_steps=6, entropy_bound=1.0, t_min=0.4, t_max=0.8,
            stability_threshold=1, confidence_threshold=0.005, seed=100 + i))

    reqs = [req(0, 40, 512), req(1, 300, 256), req(2, 7, 768), req(3, 128, 256), req(4, 64, 512)]
    if small:
        reqs = reqs[:3]
    fixed = "static" if device.type == "cpu" else "graphs"
    samplers = ("exact",) if device.type == "cpu" else ("fused", "exact")

    def run(mode: str, sampler_mode: str, batch: list[EngineRequest]) -> dict[str, list[int]]:
        engine = Engine(model, EngineConfig(max_batch=8, max_context=1536, decode_mode=mode, sampler=sampler_mode))
        done = {rid: e.token_ids for rid, e in engine.complete(batch).items() if isinstance(e, DoneEvent)}
        results.setdefault("engine_modes", {})[f"{mode}+{sampler_mode}"] = engine.decode_mode
        if mode == "graphs":  # prompts and committed canvases go through captured encoder passes too
            results["encode_graphs_captured"] = sum(b.graph is not None for b in engine.runner.encode_buckets.values())
            results[f"graphs_forwards_{sampler_mode}"] = {f"{k}/{p}": n for (k, p), n in engine.forwards.items()}
        return done

    for sampler_mode in samplers:
        captured = run(fixed, sampler_mode, reqs)
        results[f"{fixed}_equal_eager_{sampler_mode}"] = captured == run("eager", sampler_mode, reqs)
        if fixed == "graphs":
            results[f"graphs_equal_static_{sampler_mode}"] = captured == run("static", sampler_mode, reqs)
        alone = {}
        for r in reqs:
            alone.update(run(fixed, sampler_mode, [r]))
        same = sum(a == b for r in reqs for a, b in zip(captured[r.request_id], alone[r.request_id], strict=False))
        total = sum(len(alone[r.request_id]) for r in reqs)
        results[f"batched_vs_alone_identical_tokens_{sampler_mode}"] = f"{same}/{total}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, nargs="?", default=Path("gpu_checks.json"))
    p.add_argument("--cpu", action="store_true", help="run the plumbing on the CPU at tiny shapes")
    args = p.parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__}
    checks = [("fused", check_fused), ("forward", check_forward), ("fp8", check_fp8), ("engine", check_engine)]
    if args.cpu:
        checks = checks[1:]  # the fused sampler is Triton-only
    for name, fn in checks:
        t = time.time()
        try:
            fn(results, device, args.cpu)
        except Exception as exc:  # noqa: BLE001 (recorded; the other checks still run)
            results[f"{name}_error"] = repr(exc)[:600]
        results[f"{name}_seconds"] = round(time.time() - t, 1)
        args.out.write_text(json.dumps(results, indent=1))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    width = max(len(k) for k in results)
    for k, v in results.items():
        print(f"{k:<{width}}  {v}")
    return 1 if any(k.endswith("_error") for k in results) else 0


if __name__ == "__main__":
    sys.exit(main())
