"""What one decoder step costs at the real 26B-A4B config, op by op, on the CPU: FLOPs, bytes moved, kernels.

The method of `../shared/perf/` in our own code: a dispatch-level recorder sees every kernel of one engine decoder
step (each of our `dgserve` ops as the one kernel it is, with its own roofline figures from `worker/ops/cost.py`;
every aten op reading its inputs once and writing its outputs once, as an unfused CUDA-graph replay does). The real
config is cut to two layers, one sliding and one global, and scaled to 30 (25 + 5): layers of a kind are identical.
The state is the real-scale benchmark's mid-run: a 1024-token prompt and two committed canvases held per row.

    python bench/step_cost.py                    # ours at 32 and 1 rows, and the baseline engine side by side
    python bench/step_cost.py --baseline-rev none --scale tiny --rows 4 1   # a quick check (the test runs this)

The baseline is the engine as of `--baseline-rev` (default: the commit before our ops), measured in the same run
from a `git worktree` of that commit, with the same recorder. Counts do not depend on the machine.
Writes bench/results/step_cost_cpu.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REV = "d904a01"  # the engine before our own layer forward (transformers' modules, dense masks)
SCALE_TO = {"sliding_attention": 25, "full_attention": 5}  # the 30 layers of 26B-A4B

CONFIGS = {
    "real": dict(hidden_size=2816, intermediate_size=2112, num_attention_heads=16, num_key_value_heads=8,
                 num_global_key_value_heads=2, head_dim=256, global_head_dim=512, moe_intermediate_size=704,
                 num_experts=128, top_k_experts=8, sliding_window=1024, attention_k_eq_v=True,
                 max_position_embeddings=262144),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 num_global_key_value_heads=1, head_dim=32, global_head_dim=64, moe_intermediate_size=64,
                 num_experts=8, top_k_experts=2, sliding_window=96, attention_k_eq_v=True,
                 max_position_embeddings=8192),
}


# ------------------------------------------------------------------ recorder
def _unique_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches to read `t` once: expanded (stride-0) dims count once."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _aten_flops(func, args, kwargs, out) -> int:
    packet = func._overloadpacket
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=out))
    name = packet.__name__
    if name == "linear":
        x, w = args[0], args[1]
        return 2 * (x.numel() // x.shape[-1]) * w.shape[0] * w.shape[1]
    if name in ("matmul", "mm", "bmm"):
        return 2 * out.numel() * args[0].shape[-1]
    if name == "scaled_dot_product_attention":
        q, k, v = args[:3]
        return int(sdpa_flop_count(q.shape, (q.shape[0], q.shape[1], k.shape[2], k.shape[3]),
                                   (q.shape[0], q.shape[1], v.shape[2], v.shape[3])))
    if name == "_grouped_mm":  # only the routed rows (offs[-1] of them) are multiplied
        x, w = args[0], args[1]
        offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
        rows = int(offs[-1]) if offs is not None else x.shape[0]
        return 2 * rows * w.shape[-2] * w.shape[-1]
    return 0


class Recorder(TorchDispatchMode):
    """Every dispatched op: its name, FLOPs, bytes read and written, and the module running it (if tracked)."""

    def __init__(self, modules: ModuleStack | None = None):
        super().__init__()
        self.modules = modules
        self.records: list[dict] = []
        try:
            from worker.ops.cost import COSTS, padded_expert_flops
        except ImportError:  # the baseline engine has no ops of ours
            COSTS, padded_expert_flops = {}, None
        self.costs, self.padded = COSTS, padded_expert_flops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        namespace = func.namespace
        name = func._overloadpacket.__name__
        record = {"op": name, "ns": namespace, "module": self.modules.current() if self.modules else ""}
        if namespace == "dgserve":
            flops, read, written = self.costs[name](args, out)
            if name in ("moe_gate_up", "moe_down"):
                record["padded_flops"] = self.padded(args, out)
        else:
            flops, read, written = self._aten(func, args, kwargs, out)
        record.update(flops=flops, read=read, written=written)
        self.records.append(record)
        return out

    @staticmethod
    def _aten(func, args, kwargs, out) -> tuple[int, int, int]:
        schema = func._schema
        flat_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        flat_out = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        is_view = bool(schema.returns) and schema.returns[0].alias_info is not None and \
            not schema.returns[0].alias_info.is_write
        if is_view:
            in_ptrs = {a.untyped_storage().data_ptr() for a in flat_in}
            if all(o.untyped_storage().data_ptr() in in_ptrs for o in flat_out):
                return 0, 0, 0
        if func._overloadpacket.__name__ == "embedding":  # reads the looked-up rows, not the whole table
            row_bytes = flat_out[0].numel() * flat_out[0].element_size()
            return 0, row_bytes + _unique_bytes(flat_in[1]), row_bytes
        return (_aten_flops(func, args, kwargs, out), sum(_unique_bytes(a) for a in flat_in),
                sum(o.numel() * o.element_size() for o in flat_out))


class ModuleStack:
    """The innermost nn.Module running (how the baseline's ops are attributed to layers)."""

    def __init__(self, model):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []
        self.handles = [torch.nn.modules.module.register_module_forward_pre_hook(self._pre),
                        torch.nn.modules.module.register_module_forward_hook(self._post)]

    def _pre(self, mod, args):
        self.stack.append(self.names.get(id(mod), type(mod).__name__))

    def _post(self, mod, args, out):
        self.stack.pop()

    def current(self) -> str:
        return self.stack[-1] if self.stack else "<engine>"

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------- attribution
def layers_by_module(records: list[dict]) -> list[int | None]:
    """The baseline: the layer index in the module path (decoder.layers.N...)."""
    out = []
    for r in records:
        parts = r["module"].split(".")
        i = parts.index("layers") + 1 if "layers" in parts else None
        out.append(int(parts[i]) if i is not None and i < len(parts) and parts[i].isdigit() else None)
    return out


def layers_by_sequence(records: list[dict], layers: int) -> list[int | None]:
    """Ours: the self-conditioning ops up to `embed_condition`, then each layer through its `ffn_combine`."""
    out: list[int | None] = []
    layer: int | None = None
    for r in records:
        out.append(layer if layer is not None and layer < layers else None)
        if r["op"] == "embed_condition":
            layer = 0
        elif r["op"] == "ffn_combine" and layer is not None:
            layer += 1
    return out


def component(r: dict, prev_ops: list[str], layer: int | None) -> str:
    """Group ops into the components of the README's table."""
    op, module = r["op"], r["module"]
    if r["ns"] == "dgserve":
        return {"rms_norm": "self_conditioning", "embed_condition": "embed_and_norms",
                "post_attention": "residual_and_norms", "ffn_combine": "residual_and_norms(+experts sum)",
                "qk_norm_rope_store": "qk_norms_rope_kv_store", "attention": "attention",
                "gate_up_gelu": "dense_mlp" if layer is not None else "self_conditioning",
                "moe_route": "router", "moe_align": "router", "moe_gate_up": "experts",
                "moe_down": "experts"}.get(op, op)
    if module:  # the baseline: by module, as ../shared/perf does
        if ".self_attn." in module and module.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj"):
            return "attn_proj"
        if ".self_attn" in module:
            return "attention" if "attention" in op else ("attn_kv_cat" if op == "cat" else "attn_norms_rope_copies")
        if module.endswith(".experts"):
            return "experts" if op == "_grouped_mm" else "experts_sort_gather_scatter"
        if ".router" in module:
            return "router"
        if ".mlp" in module:
            return "dense_mlp"
        if "self_conditioning" in module:
            return "self_conditioning"
        if ".layers." in module:
            return "residual_and_norms"
        return "embed_and_norms" if ("embed" in module or module.endswith(".norm")) else "engine_glue"
    last = prev_ops[-1] if prev_ops else ""
    if layer is None:
        return "self_conditioning" if op in ("linear", "mm", "addmm") else "engine_glue(inputs into the buffers)"
    if op in ("linear", "mm", "addmm"):
        return {"attention": "attn_proj", "gate_up_gelu": "dense_mlp"}.get(last, "attn_proj")
    return "engine_glue"


def scale(records: list[dict], layer_of: list[int | None], layer_types: list[str]) -> dict:
    """Totals scaled to 30 layers, and by component. Kernels: ops that move bytes or compute."""
    totals = {"tflop": 0.0, "gb": 0.0, "kernels": 0, "padded_expert_tflop": 0.0}
    parts: dict[str, dict[str, float]] = defaultdict(lambda: {"tflop": 0.0, "gb": 0.0, "kernels": 0})
    prev: list[str] = []
    expert_flops = 0.0
    for r, layer in zip(records, layer_of, strict=True):
        mult = 1 if layer is None else SCALE_TO[layer_types[layer]]
        name = component(r, prev, layer)
        prev.append(r["op"])
        moved = r["read"] + r["written"]
        if moved == 0 and r["flops"] == 0:
            continue
        for target in (totals, parts[name]):
            target["tflop"] += mult * r["flops"] / 1e12
            target["gb"] += mult * moved / 1e9
            target["kernels"] += mult
        expert_flops += mult * r.get("padded_flops", r["flops"] if name == "experts" else 0) / 1e12
    totals["padded_expert_tflop"] = expert_flops
    rounded = {k: round(v, 6) if isinstance(v, float) else v for k, v in totals.items()}
    return {**rounded, "by_component": {k: {m: round(v, 6) if isinstance(v, float) else v for m, v in d.items()}
                                         for k, d in sorted(parts.items(), key=lambda kv: -kv[1]["gb"])}}


# ------------------------------------------------------------------- model
def build(config: str, vocab: int, device: str | torch.device = "cpu"):
    """The 26B-A4B architecture (or `tiny`) cut to two layers (sliding, global), bf16 random weights. Encoder and
    decoder layers share their weights, as in the checkpoint."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, Gemma4VisionConfig

    text = dict(CONFIGS[config], vocab_size=vocab, num_hidden_layers=2,
                layer_types=["sliding_attention", "full_attention"])
    vision = Gemma4VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=32).to_dict()
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=256 if config == "real" else 32)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(cfg)
    torch.set_default_dtype(torch.float32)
    model.model.encoder.language_model.layers = torch.nn.ModuleList()
    model = model.to_empty(device=device)
    table = model.model.decoder.embed_tokens.weight  # the checkpoint's ties, made by hand (tie_weights() wants
    model.lm_head.weight = table  # the encoder layers as modules of their own class; the runner reads weights only)
    model.model.encoder.language_model.embed_tokens.weight = table
    init_random(model, torch.device(device), torch.Generator(device=device).manual_seed(0))
    model.model.encoder.language_model.layers = model.model.decoder.layers
    return model.eval()


def init_random(module: torch.nn.Module, device: torch.device, generator: torch.Generator) -> None:
    """Random weights in place, activations of realistic size throughout: matrices N(0, 0.02), norm weights and
    scales 1, other vectors 0, layer scalars 1; the non-persistent buffers `to_empty` left empty (rotary tables,
    embedding scales) rebuilt."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=generator)
            else:
                p.fill_(1.0) if "scale" in name or "norm" in name else p.zero_()
        for name, b in module.named_buffers():
            if "layer_scalar" in name:
                b.fill_(1.0)
        for mod in module.modules():
            if mod.__class__.__name__.endswith("RotaryEmbedding"):
                for bn, bv in mod.__class__(mod.config, device=device).named_buffers():
                    getattr(mod, bn).copy_(bv)
            if hasattr(mod, "scalar_embed_scale"):
                mod.embed_scale.fill_(mod.scalar_embed_scale)


def fill_pool(keys: list[torch.Tensor], values: list[torch.Tensor], rows: int, g: torch.Generator) -> None:
    for k, v in zip(keys, values, strict=True):
        k[:rows].normal_(0, 1, generator=g)
        v[:rows].normal_(0, 1, generator=g)


def step_inputs(vocab: int, rows: int, L: int, H: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    canvas = torch.randint(0, vocab, (rows, L), generator=g)
    soft = (torch.randn((rows, L, H), generator=g) * 0.02).to(torch.bfloat16)
    return canvas, soft


def measure_ours(model, rows: int, context: int, max_batch: int, max_context: int) -> dict:
    from worker.engine import Engine, EngineConfig

    engine = Engine(model, EngineConfig(max_batch=max_batch, max_context=max_context, decode_mode="static",
                                        sampler="fast"))
    g = torch.Generator().manual_seed(0)
    engine.pool.total[:rows] = [context] * rows
    fill_pool(engine.pool.keys, engine.pool.values, rows, g)
    canvas, soft = step_inputs(engine.vocab_size, rows, engine.canvas_length, engine.text_config.hidden_size, g)
    recorder = Recorder()
    with recorder:
        engine.runner.decode(canvas, soft)
    types = list(engine.text_config.layer_types)
    return scale(recorder.records, layers_by_sequence(recorder.records, len(types)), types)


def measure_baseline(model, rows: int, context: int, max_batch: int, max_context: int) -> dict:
    """The engine at BASELINE_REV (imported from its worktree), in the same state, through its internals of the
    time (`_Row`, `_decoder_hidden`)."""
    from worker.engine import Engine, EngineConfig, _Row  # type: ignore[attr-defined]
    from worker.types import EngineRequest, SamplingParams

    engine = Engine(model, EngineConfig(max_batch=max_batch, max_context=max_context, decode_mode="static",
                                        sampler="fast", sample_chunk_rows=1))
    g = torch.Generator().manual_seed(0)
    L, H = engine.canvas_length, engine.text_config.hidden_size
    params = SamplingParams(max_new_tokens=1024, seed=0, eos_token_ids=(), max_denoising_steps=16, entropy_bound=0.1,
                            t_min=0.4, t_max=0.8, stability_threshold=1, confidence_threshold=0.005)
    canvas, soft = step_inputs(engine.vocab_size, rows, L, H, g)
    for i in range(rows):
        engine.rows.append(_Row(req=EngineRequest(f"r{i}", [2] * 1024, params), slot=i, generator=torch.Generator(),
                                canvas=canvas[i], prev_draft=torch.full((L,), -1), soft=soft[i], fixed=None,
                                fixed_ids=None))
        engine.pool.total[i] = context
    fill_pool(engine.pool.keys, engine.pool.values, rows, g)
    modules = ModuleStack(model)
    recorder = Recorder(modules)
    with recorder:
        engine._decoder_hidden(canvas, soft)
    modules.remove()
    return scale(recorder.records, layers_by_module(recorder.records), list(engine.text_config.layer_types))


def minimum_tflop(config: str, rows: int, context: int, canvas: int) -> float:
    """The step's GEMM-like work at its minimum, scaled to 30 layers: projections, dense MLP, router, the routed
    experts, self-conditioning, and attention of each canvas over its cache and itself."""
    c = CONFIGS[config]
    H, Hq, E, k = c["hidden_size"], c["num_attention_heads"], c["num_experts"], c["top_k_experts"]
    tokens = rows * canvas
    per_token = 2 * 3 * H * c["intermediate_size"]  # self-conditioning
    total = 0.0
    for kind, layers in SCALE_TO.items():
        D = c["global_head_dim"] if kind == "full_attention" else c["head_dim"]
        kv = c["num_global_key_value_heads"] if kind == "full_attention" else c["num_key_value_heads"]
        values = 0 if (kind == "full_attention" and c["attention_k_eq_v"]) else kv * D
        held = context if kind == "full_attention" else min(context, c["sliding_window"] - 1)
        proj = 2 * H * (Hq * D + kv * D + values) + 2 * Hq * D * H
        ffn = 2 * 3 * H * c["intermediate_size"] + 2 * H * E + k * 2 * 3 * H * c["moe_intermediate_size"]
        attn = 4 * Hq * D * (held + canvas)
        total += layers * tokens * (proj + ffn + attn)
    return (total + tokens * per_token) / 1e12


# ------------------------------------------------------------------- driver
def child(args) -> int:
    """Measure one engine (ours or the baseline) at each row count; print one JSON line."""
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = build(args.scale, args.vocab)
    measure = measure_baseline if args.child == "baseline" else measure_ours
    context = args.context if args.scale == "real" else 64
    out = {}
    for rows in args.rows:
        started = time.time()
        with torch.inference_mode():
            out[f"batch_{rows}"] = measure(model, rows, context, max(args.rows), args.max_context)
        print(f"[{args.child}] {rows} rows: {out[f'batch_{rows}']['gb']:.1f} GB, "
              f"{out[f'batch_{rows}']['kernels']} kernels ({time.time() - started:.0f}s)", file=sys.stderr, flush=True)
    print(json.dumps(out))
    return 0


def run_child(which: str, args, pythonpath: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", which, "--scale", args.scale, "--vocab",
           str(args.vocab), "--context", str(args.context), "--max-context", str(args.max_context), "--rows",
           *map(str, args.rows)]
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    print(f"measuring {which} ({pythonpath})", flush=True)
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_tree(rev: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="dgserve-baseline-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
    return path


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, ("gb", "kernels"), strict=True):
        labels, before, after = [], [], []
        for rows in ("batch_32", "batch_1"):
            if rows in result and rows in result.get("baseline", {}):
                n = int(rows.replace("batch_", ""))
                labels.append(f"{n} row{'s' if n > 1 else ''}")
                before.append(result["baseline"][rows][key])
                after.append(result[rows][key])
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], before, 0.4, label="baseline engine", color="#999")
        ax.bar([i + 0.2 for i in x], after, 0.4, label="ours (fused ops)", color="#2a7")
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            ax.text(i + 0.2, a, f"{a:.0f}\n({b / a:.1f}x less)", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), labels)
        ax.set_ylabel({"gb": "GB moved per decoder step", "kernels": "kernels per decoder step"}[key])
        ax.legend(loc="upper center")
    fig.suptitle("One decoder step of DiffusionGemma 26B-A4B (30 layers, bf16, mid-run: 1536 tokens held per row)"
                 "\ncounted op by op on the CPU (bench/step_cost.py)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[32, 1], help="rows per step to measure")
    p.add_argument("--scale", choices=sorted(CONFIGS), default="real")
    p.add_argument("--vocab", type=int, default=16384, help="small: the embedding is not part of the decoder step")
    p.add_argument("--context", type=int, default=1536, help="tokens held per row (1024 prompt + 2 canvases)")
    p.add_argument("--max-context", type=int, default=2304, help="the pool's full-layer capacity")
    p.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the baseline engine, or 'none'")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "step_cost_cpu.json")
    p.add_argument("--child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    result: dict = {"benchmark": "decoder step cost", "config": f"26B-A4B ({args.scale}), 30 layers (25 sliding + "
                    "5 global) scaled from 2, bf16", "context_held": args.context, "max_context": args.max_context,
                    "vocab": args.vocab, "recorder": "bench/step_cost.py (dgserve ops: worker/ops/cost.py)"}
    result.update(run_child("ours", args, ROOT))
    context = args.context if args.scale == "real" else 64
    canvas = 256 if args.scale == "real" else 32
    for rows in args.rows:
        minimum = minimum_tflop(args.scale, rows, context, canvas)
        result[f"batch_{rows}"]["minimum_tflop"] = round(minimum, 4)
        result[f"batch_{rows}"]["flops_vs_minimum"] = round(result[f"batch_{rows}"]["tflop"] / minimum, 4)
    if args.baseline_rev != "none":
        tree = baseline_tree(args.baseline_rev)
        try:
            result["baseline"] = {"rev": args.baseline_rev, **run_child("baseline", args, tree)}
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    result["by_component"] = {key: result[key].pop("by_component") for key in list(result)
                              if key.startswith("batch_")}
    for key, value in result.get("baseline", {}).items():
        if key.startswith("batch_"):
            result["by_component"][f"baseline_{key}"] = value.pop("by_component")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if "baseline" in result:
        plot(result, args.out.with_suffix(".png"))
    for key in [k for k in result if k.startswith("batch_")]:
        ours, base = result[key], result.get("baseline", {}).get(key)
        line = f"{key}: {ours['tflop']:.2f} TFLOP ({ours['flops_vs_minimum']:.3f}x min), {ours['gb']:.1f} GB, " \
               f"{ours['kernels']} kernels"
        if base:
            line += f"  | baseline {base['tflop']:.2f} TFLOP, {base['gb']:.1f} GB, {base['kernels']} kernels " \
                    f"({base['gb'] / ours['gb']:.2f}x the bytes, {base['kernels'] / ours['kernels']:.1f}x the kernels)"
        print(line)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
