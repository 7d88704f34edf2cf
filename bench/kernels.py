"""Each Triton op at the real 26B-A4B shapes against its plain-torch implementation on the same GPU.

For 1 and 32 canvas rows (N = rows x 256 tokens), in the mid-run state of the real-scale benchmark (a 1024-token
prompt and two committed canvases per row: sliding layers hold 1023 keys, global ones 1536), every op that
`worker/ops/triton_kernels.py` registers is timed with `triton.testing.do_bench` (median; the L2 cache is flushed
before each run, as a step's weights arrive cold), its Triton kernel (`triton_function(name)`) and its plain-torch
body (`PLAIN[name]`) on the same inputs. Each row prints the op's own roofline figures (`worker/ops/cost.py`: FLOPs,
bytes read and written), the achieved TB/s and TFLOP/s, and the share of the roofline time reached
(max(bytes / 4.8 TB/s, FLOPs / peak)); the largest difference between the two implementations' outputs shows that
both computed the same thing.

    python bench/kernels.py [--rows 1 32] [--out bench/results/kernels_h200.json]     # on a GPU
    python bench/kernels.py --smoke --out /tmp/k.json    # the plumbing on the CPU: tiny shapes, the interpreter
                                                         # (TRITON_INTERPRET=1), one call each, no timing claims
On a CPU without --smoke it says that it needs a GPU and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HBM_BYTES_S = 4.8e12  # H200 HBM3e
PEAK_FLOP_S = {"bf16": 989e12, "fp8": 1979e12}  # H200 dense tensor-core peaks
MUTATING = ("qk_norm_rope_store",)  # ops that write into their arguments


@dataclass(frozen=True)
class Shapes:
    hidden: int
    heads: int
    sliding: tuple[int, int, int, int]  # KV heads, head dim, capacity, keys held mid-run
    full: tuple[int, int, int, int]
    window: int
    dense_inter: int
    experts: int
    top_k: int
    expert_inter: int
    vocab: int
    canvas: int


REAL = Shapes(hidden=2816, heads=16, sliding=(8, 256, 1279, 1023), full=(2, 512, 4096, 1536), window=1024,
              dense_inter=2112, experts=128, top_k=8, expert_inter=704, vocab=262144, canvas=256)
TINY = Shapes(hidden=64, heads=4, sliding=(2, 32, 40, 23), full=(1, 64, 64, 40), window=24, dense_inter=48,
              experts=8, top_k=2, expert_inter=32, vocab=512, canvas=16)


@dataclass
class Case:
    name: str  # the op, with the variant where an op has several (the attention layers)
    op: str
    args: tuple
    precision: str = "bf16"


@dataclass
class Row:
    case: str
    rows: int
    triton_us: float
    torch_us: float
    speedup: float
    gflop: float
    gb_read: float
    gb_written: float
    tb_s: float
    tflop_s: float
    roofline_us: float
    of_roofline: float
    max_abs_diff: float


def cases(s: Shapes, rows: int, device, dtype) -> list[Case]:
    """Every op's inputs for `rows` canvas rows, as the model runner calls it."""
    import torch

    from worker.ops.registry import PLAIN

    g = torch.Generator(device=device).manual_seed(rows)
    N, H, L, eps = rows * s.canvas, s.hidden, s.canvas, 1e-6

    def rand(*shape, scale=1.0, offset=0.0, dt=dtype):
        return (torch.randn(shape, generator=g, device=device) * scale + offset).to(dt)

    def norm_w():
        return rand(H, scale=0.1, offset=1.0)

    x, h = rand(N, H), rand(N, H)
    ids = torch.randint(0, s.vocab, (N,), generator=g, device=device)
    table = rand(s.vocab, H)
    topk_weights = torch.softmax(rand(N, s.top_k, dt=torch.float32), -1)
    out = [
        Case("rms_norm", "rms_norm", (x, norm_w(), eps)),
        Case("post_attention", "post_attention", (h, x, norm_w(), norm_w(), norm_w(), norm_w(), eps, H ** -0.5)),
        Case("ffn_combine", "ffn_combine", (h, x, rand(N, s.top_k, H), topk_weights, norm_w(), norm_w(), norm_w(),
                                            rand(1), norm_w(), eps)),
        Case("embed_condition", "embed_condition", (ids, table, H ** 0.5, x, norm_w(), eps)),
        Case("embed_norm", "embed_norm", (ids, table, H ** 0.5, norm_w(), eps)),
        Case("gate_up_gelu", "gate_up_gelu", (x, rand(s.dense_inter, H, scale=H ** -0.5),
                                              rand(s.dense_inter, H, scale=H ** -0.5))),
    ]
    positions = (torch.arange(L, device=device) + 1536)[None, :].expand(rows, L).contiguous()
    slots = torch.arange(rows, device=device)
    for kind, (kv_heads, D, capacity, held) in (("sliding", s.sliding), ("global", s.full)):
        pools = [rand(rows + 1, kv_heads, capacity, D) for _ in range(2)]
        start = torch.full((rows,), held, device=device)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device).float() / D))
        v = rand(N, kv_heads * D) if kind == "sliding" else None  # global layers: values are the keys
        out.append(Case(f"qk_norm_rope_store {kind}", "qk_norm_rope_store", (
            rand(N, s.heads * D), rand(N, kv_heads * D), v, norm_w()[:D].contiguous(), norm_w()[:D].contiguous(),
            positions, inv_freq, 1.0, *pools, slots, start, eps)))
        q = rand(rows, L, s.heads, D)
        out.append(Case(f"attention {kind} decoder", "attention",
                        (q, *pools, slots, start + L, start, False, 0, 1.0)))
        window = s.window if kind == "sliding" else 0
        out.append(Case(f"attention {kind} encoder", "attention",
                        (q, *pools, slots, start, start - L, True, window, 1.0)))
    router, scale = rand(s.experts, H, scale=H ** -0.5), rand(s.experts, scale=0.1, offset=1.0)
    weights, top = PLAIN["moe_route"](x, router, scale, s.top_k)
    block = moe_block(device)
    aligned = PLAIN["moe_align"](top, s.experts, block)
    act = rand(aligned[0].shape[0], s.expert_inter)
    out += [
        Case("moe_route", "moe_route", (x, router, scale, s.top_k)),
        Case("moe_align", "moe_align", (top, s.experts, block)),
        Case("moe_gate_up", "moe_gate_up", (x, rand(s.experts, 2 * s.expert_inter, H, scale=H ** -0.5), *aligned,
                                            s.top_k)),
        Case("moe_down", "moe_down", (act, rand(s.experts, H, s.expert_inter, scale=s.expert_inter ** -0.5),
                                      *aligned, N, s.top_k)),
    ]
    return out + fp8_cases(s, rows, x, aligned, rand)


def fp8_cases(s: Shapes, rows: int, x, aligned, rand) -> list[Case]:
    """The fp8 twins of the GEMMs (block-scaled e4m3 weights, `worker/fp8.py`)."""
    from worker.fp8 import quantize

    H, N = s.hidden, x.shape[0]
    dense = [quantize(rand(s.dense_inter, H, scale=H ** -0.5)) for _ in range(2)]
    proj = quantize(rand(s.heads * s.sliding[1], H, scale=H ** -0.5))
    gate_up = quantize(rand(s.experts, 2 * s.expert_inter, H, scale=H ** -0.5))
    down = quantize(rand(s.experts, H, s.expert_inter, scale=s.expert_inter ** -0.5))
    act = rand(aligned[0].shape[0], s.expert_inter)
    return [
        Case("linear_fp8 q_proj", "linear_fp8", (x, *proj), "fp8"),
        Case("gate_up_gelu_fp8", "gate_up_gelu_fp8", (x, *dense[0], *dense[1]), "fp8"),
        Case("moe_gate_up_fp8", "moe_gate_up_fp8", (x, *gate_up, *aligned, s.top_k), "fp8"),
        Case("moe_down_fp8", "moe_down_fp8", (act, *down, *aligned, N, s.top_k), "fp8"),
    ]


def moe_block(device) -> int:
    """The aligned layout's block the model runner uses on this device."""
    if device.type == "cuda":
        from worker.ops.triton.moe import BLOCK_M

        return BLOCK_M
    return 16


def _outputs(value) -> list:
    return list(value) if isinstance(value, tuple | list) else [value]


def max_abs_diff(a, b) -> float:
    """Largest difference between two ops' outputs (integer outputs: the number of differing entries)."""
    worst = 0.0
    for x, y in zip(_outputs(a), _outputs(b), strict=True):
        if x.is_floating_point():
            worst = max(worst, float((x.float() - y.float()).abs().max()) if x.numel() else 0.0)
        else:
            worst = max(worst, float((x != y).sum()))
    return worst


def timer(device) -> Callable[[Callable], float]:
    """Seconds one call takes: do_bench's median on a GPU; one timed call on the CPU (smoke: no claims)."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3

    def once(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return once


def measure(case: Case, rows: int, time_of) -> Row:
    from worker.ops.cost import COSTS
    from worker.ops.registry import PLAIN
    from worker.ops.triton_kernels import triton_function

    ours, plain = triton_function(case.op), PLAIN[case.op]
    fresh = case.args
    if case.op in MUTATING:  # the spec writes into pools of its own
        fresh = tuple(a.clone() if hasattr(a, "clone") else a for a in case.args)
    out = ours(*case.args)
    diff = max_abs_diff(out, plain(*fresh))
    t_ours = time_of(lambda: ours(*case.args))
    t_plain = time_of(lambda: plain(*case.args))
    flops, read, written = COSTS[case.op](case.args, out)
    roofline = max((read + written) / HBM_BYTES_S, flops / PEAK_FLOP_S[case.precision])
    return Row(case=case.name, rows=rows, triton_us=t_ours * 1e6, torch_us=t_plain * 1e6, speedup=t_plain / t_ours,
               gflop=flops / 1e9, gb_read=read / 1e9, gb_written=written / 1e9,
               tb_s=(read + written) / t_ours / 1e12, tflop_s=flops / t_ours / 1e12, roofline_us=roofline * 1e6,
               of_roofline=roofline / t_ours, max_abs_diff=diff)


def print_row(r: Row) -> None:
    print(f"{r.case:28s} {r.rows:3d} {r.triton_us:10.1f} {r.torch_us:10.1f} {r.speedup:7.1f}x "
          f"{r.gb_read + r.gb_written:8.3f} {r.gflop:9.1f} {r.tb_s:6.2f} {r.tflop_s:7.1f} {r.roofline_us:9.1f} "
          f"{r.of_roofline:6.0%} {r.max_abs_diff:9.3g}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny shapes under the interpreter")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench/kernels.py times the Triton kernels on a GPU; no CUDA device here (--smoke checks the "
              "plumbing on the CPU)")
        return 0
    sys.path.insert(0, str(ROOT))
    import triton

    import worker.ops  # noqa: F401  (registers the ops)

    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = TINY if args.smoke else REAL
    card = "cpu" if args.smoke else torch.cuda.get_device_name().split()[-1].lower()
    out_path = args.out or ROOT / "bench" / "results" / f"kernels_{card}.json"
    time_of = timer(device)
    print(f"{'op':28s} {'rows':>3s} {'triton us':>10s} {'torch us':>10s} {'speedup':>8s} {'GB':>8s} {'GFLOP':>9s} "
          f"{'TB/s':>6s} {'TFLOP/s':>7s} {'roof us':>9s} {'roof':>6s} {'max diff':>9s}")
    results = []
    with torch.inference_mode():
        for rows in args.rows:
            for case in cases(shapes, rows, device, torch.bfloat16):
                row = measure(case, rows, time_of)
                print_row(row)
                results.append(asdict(row))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report = {"benchmark": "kernels", "device": card, "torch": torch.__version__, "triton": triton.__version__,
              "smoke": args.smoke, "shapes": asdict(shapes), "hbm_bytes_s": HBM_BYTES_S, "peak_flop_s": PEAK_FLOP_S,
              "results": results}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
