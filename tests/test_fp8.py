"""DG_QUANTIZATION=fp8: block-scaled e4m3 weights (worker/fp8.py), the fp8 GEMM ops (worker/ops/fp8.py) and their
Triton kernels (worker/ops/triton/fp8.py), the model runner on fp8 weights.

On a CPU the kernels run under TRITON_INTERPRET=1 (set here before triton is imported); the interpreter handles
float8 tensors (loads, the float32 upcast), and the kernels round to e4m3 there by bit arithmetic. On a GPU,
`TRITON_INTERPRET=0 pytest tests/test_fp8.py` runs the same comparisons on the compiled kernels (fp8 wgmma, the
hardware's rounding conversion) against the spec on the CPU, and three GPU-only checks: the ops dispatch to the
kernels, an fp8 chain never syncs with the host and replays as a CUDA graph. Without a GPU, the kernels are also
compiled for sm90 at the real shapes (tests/sm90.py).

Tolerances (kernels against the spec): both multiply the same e4m3 activations by the same e4m3 weights (scales
are powers of two: every product is exact), summed in float32 in another order, then round where the model-dtype
op rounds. So: float32 1e-5 relative plus 1e-5 of the output's largest magnitude (cancellation); bf16 at most
2 ulps plus 1 ulp of the largest magnitude, and at least 95% of the values bit-identical (90% on a GPU, whose fp8
tensor-core sums keep fewer bits within each 128-channel block before the float32 promotion).
"""

from __future__ import annotations

import inspect
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import worker.ops  # noqa: E402,F401  (registers the ops)
from worker import fp8  # noqa: E402
from worker.ops.registry import PLAIN  # noqa: E402

pytest.importorskip("triton")

from tests.test_triton_moe import on_device  # noqa: E402  (its DEVICE is ours wherever needs_kernels runs a test)
from tests.test_triton_norms import assert_matches as _assert_matches  # noqa: E402
from worker.ops.triton import fp8 as tfp8  # noqa: E402
from worker.ops.triton import mlp  # noqa: E402
from worker.ops.triton_kernels import TRITON_OPS, triton_function  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"
needs_kernels = pytest.mark.skipif(not INTERPRET and DEVICE != "cuda",
                                   reason="TRITON_INTERPRET=0 and no CUDA device to run the kernels on")
needs_cuda = pytest.mark.skipif(INTERPRET or DEVICE != "cuda", reason="a CUDA device and TRITON_INTERPRET=0")
TEXT = Path(__file__).resolve().parents[1] / "models" / "text"
DTYPES = [torch.float32, torch.bfloat16]
FP8_OPS = ("linear_fp8", "gate_up_gelu_fp8", "moe_gate_up_fp8", "moe_down_fp8")


def assert_matches(ours: torch.Tensor, ref: torch.Tensor) -> None:
    _assert_matches(ours, ref, exact_share=0.95 if INTERPRET else 0.9)


def weights(g: torch.Generator, *shape: int) -> fp8.Fp8Weight:
    """A quantized weight whose 128 x 128 blocks differ in scale by up to 2^6."""
    w = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    rows = torch.arange(shape[-2])[:, None] // 128
    cols = torch.arange(shape[-1])[None, :] // 128
    return fp8.quantize(w * 2.0 ** ((rows * 5 + cols * 3) % 7 - 3))


# ---------------------------------------------------------------------------------------------- the format


@pytest.mark.parametrize("shape", [(300, 200), (3, 130, 260)])
def test_block_scales_are_powers_of_two_and_the_round_trip_is_within_e4m3(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1])  # magnitudes differing per block
    q, scale = fp8.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))  # powers of two
    s = fp8.dequantize_blocks(torch.ones_like(w), scale, 128, 128, torch.float32)  # each value's block scale
    blocks = torch.nn.functional.pad(w.abs(), (0, -shape[-1] % 128, 0, -shape[-2] % 128))
    block_amax = blocks.unflatten(-1, (-1, 128)).unflatten(-3, (-1, 128)).amax(dim=(-3, -1))
    ratio = block_amax / scale
    assert bool(((ratio > 224) & (ratio <= 448)).all()), "each block's largest value in e4m3's top binade"
    back = fp8.dequantize(q, scale, torch.float32)
    # e4m3 keeps 3 mantissa bits (half an ulp: 2^-4 relative); below 2^-6 x scale its step is 2^-9 x scale
    assert bool(((back - w).abs() <= torch.maximum(w.abs() * 2.0 ** -4, s * 2.0 ** -10)).all())
    q2, scale2 = fp8.quantize(back)  # the dequantized weight is exact: quantizing it again changes nothing
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(scale2, scale)
    assert torch.equal(fp8.dequantize(q, scale, torch.bfloat16).float(), back)  # exact in bf16 too


def test_zeros_quantize_to_zeros_with_a_finite_scale():
    q, scale = fp8.quantize(torch.zeros(130, 40))
    assert (q.float() == 0).all() and torch.isfinite(scale).all() and (scale > 0).all()
    assert (fp8.fake_quant(torch.zeros(3, 200, dtype=torch.bfloat16)) == 0).all()


def test_activations_round_to_e4m3_per_token_and_128_channel_group():
    """Group scale 1 where the group's largest value is 448: ties go to even, subnormals are kept (and rounded
    to even too); a group whose largest value is 449 gets scale 2 (at scale 1, 3 x 2^-11 would be 2^-9)."""
    x = torch.zeros(2, 256)
    x[0, :6] = torch.tensor([448.0, 232.0, 248.0, -232.0, 0.001, 3 * 2.0 ** -10])
    x[0, 128:130] = torch.tensor([449.0, 3 * 2.0 ** -11])
    x[1, 0] = 2.0 ** -11  # alone in its group: its own scale
    out = fp8.fake_quant(x)
    assert out[0, :6].tolist() == [448.0, 224.0, 256.0, -224.0, 2.0 ** -9, 2.0 ** -8]
    assert out[0, 128:130].tolist() == [448.0, 0.0]  # 449 / 2 -> 224; 3 x 2^-12 is under half the step 2^-9
    assert out[1, 0].item() == 2.0 ** -11


# ------------------------------------------------------------------------------------------------ the kernels


@needs_kernels
def test_every_fp8_op_has_a_triton_twin_with_the_specs_signature():
    assert TRITON_OPS["fp8"] == FP8_OPS
    for name in FP8_OPS:
        fn = triton_function(name)
        assert fn is not None and inspect.signature(fn) == inspect.signature(PLAIN[name]), name


@needs_kernels
def test_the_kernels_round_activations_as_the_spec():
    """linear_fp8 with an identity weight returns the quantized activations themselves (the cases above)."""
    x = torch.zeros(2, 256)
    x[0, :6] = torch.tensor([448.0, 232.0, 248.0, -232.0, 0.001, 3 * 2.0 ** -10])
    x[0, 128:130] = torch.tensor([449.0, 3 * 2.0 ** -11])
    x[1, 0] = 2.0 ** -11
    x[1, 1:] = torch.randn(255, generator=torch.Generator().manual_seed(0)) * 3
    eye = fp8.quantize(torch.eye(256))
    assert torch.equal(on_device(tfp8.linear_fp8)(x, *eye), fp8.fake_quant(x))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,n_out", [(37, 200, 150), (5, 128, 64)])
def test_linear_fp8_matches_the_spec(dtype, n, k, n_out):
    """Both shape classes' tiles; K 200 is one whole and one partial group; 150 outputs cross a scale block."""
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, k, generator=g) * 2).to(dtype)
    w = weights(g, n_out, k)
    ref = PLAIN["linear_fp8"](x, *w)
    for blocks in (tfp8.LINEAR_SMALL, tfp8.LINEAR_LARGE):
        assert_matches(on_device(lambda *a, b=blocks: tfp8.linear_launch(*a, b))(x, *w), ref)
    # the activations really are quantized: the unquantized product differs in most values
    plain = torch.nn.functional.linear(x, fp8.dequantize(*w, dtype))
    assert (plain != ref).float().mean() > 0.5


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_up_gelu_fp8_matches_the_spec(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, 200, generator=g).to(dtype)
    w_gate, w_up = weights(g, 150, 200), weights(g, 150, 200)
    ref = PLAIN["gate_up_gelu_fp8"](x, *w_gate, *w_up)
    for blocks in (tfp8.GATE_UP_SMALL, tfp8.GATE_UP_LARGE):
        def launch(x, wg, sg, wu, su, blocks=blocks):
            return mlp.launch(x, wg, wu, blocks, (sg, su))
        assert_matches(on_device(launch)(x, *w_gate, *w_up), ref)
    assert_matches(on_device(tfp8.gate_up_gelu_fp8)(x, *w_gate, *w_up), ref)


E, BLOCK = 8, 16
# (tokens, top-k, H, I): H 200 ends in a partial group; 2I = 160 puts the up half's first rows in the gate half's
# last scale block; I 80 is one partial group of the down GEMM, H 144 two output tiles
MOE_CASES = [(1, 2, 128, 32), (17, 3, 200, 80), (40, 3, 144, 48)]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,h,inter", MOE_CASES)
def test_moe_fp8_gemms_match_the_spec(dtype, n, k, h, inter):
    g = torch.Generator().manual_seed(n)
    ids = torch.rand((n, E), generator=g).topk(k, dim=-1).indices.to(torch.int32)
    aligned = PLAIN["moe_align"](ids, E, BLOCK)
    x = torch.randn((n, h), generator=g).to(dtype)
    w_gate_up, w_down = weights(g, E, 2 * inter, h), weights(g, E, h, inter)
    act_ref = PLAIN["moe_gate_up_fp8"](x, *w_gate_up, *aligned, k)
    act = on_device(tfp8.moe_gate_up_fp8)(x, *w_gate_up, *aligned, k)
    assert_matches(act, act_ref)
    assert (act[aligned[0] == n * k] == 0).all()  # padding rows
    assert_matches(on_device(tfp8.moe_down_fp8)(act_ref, *w_down, *aligned, n, k),
                   PLAIN["moe_down_fp8"](act_ref, *w_down, *aligned, n, k))


@needs_kernels
def test_weights_that_are_not_float8_are_refused_clearly():
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float8_e4m3fn weights"):
        tfp8.linear_fp8(x, torch.zeros(16, 128, dtype=torch.bfloat16), torch.ones(1, 1))
    aligned = PLAIN["moe_align"](torch.zeros((4, 1), dtype=torch.int32), E, BLOCK)
    with pytest.raises(ValueError, match="float8_e4m3fn weights"):
        tfp8.moe_gate_up_fp8(x, torch.zeros(E, 32, 128, dtype=torch.bfloat16), torch.ones(E, 1, 1), *aligned, 1)


@needs_cuda
def test_the_ops_dispatch_to_the_fp8_kernels_on_cuda():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g).to(torch.bfloat16).cuda()
    w = tuple(t.cuda() for t in weights(g, 128, 256))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = torch.ops.dgserve.linear_fp8(x, *w)
        torch.cuda.synchronize()
    assert "_linear_fp8_kernel" in {e.name for e in prof.events()}
    assert torch.equal(out, tfp8.linear_fp8(x, *w))


@needs_cuda
def test_an_fp8_layer_never_syncs_and_replays_as_a_cuda_graph():
    """The fp8 GEMMs of one layer at E = 128, k = 8 and the runner's block: eager under the sync debugger, then
    captured once and replayed on new tokens (whose routing, and so layout, differs)."""
    from worker.ops.triton import moe as tmoe

    n, k, h, inter, experts = 256, 8, 256, 128, 128
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(n, h, generator=g).to(torch.bfloat16) for _ in range(2)]
    router = torch.randn(experts, h, generator=g).to(torch.bfloat16) / h ** 0.5
    w = [weights(g, 384, h), weights(g, inter, h), weights(g, inter, h), weights(g, h, inter),
         weights(g, experts, 2 * inter, h), weights(g, experts, h, inter)]

    def layer(ops, x, router, w):
        q = ops["linear_fp8"](x, *w[0])
        m = ops["linear_fp8"](ops["gate_up_gelu_fp8"](x, *w[1], *w[2]), *w[3])
        _, ids = ops["moe_route"](x, router, torch.ones(experts, dtype=x.dtype, device=x.device), k)
        aligned = ops["moe_align"](ids, experts, tmoe.BLOCK_M)
        act = ops["moe_gate_up_fp8"](x, *w[4], *aligned, k)
        return q, m, ops["moe_down_fp8"](act, *w[5], *aligned, n, k)

    ours = {name: triton_function(name) for name in (*FP8_OPS, "moe_route", "moe_align")}
    static_x, static_router = xs[0].cuda(), router.cuda()
    static_w = [fp8.Fp8Weight(a.cuda(), b.cuda()) for a, b in w]
    layer(ours, static_x, static_router, static_w)  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(ours, static_x, static_router, static_w)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer(ours, static_x, static_router, static_w)
    for x in xs[::-1]:
        static_x.copy_(x)
        graph.replay()
        for a, b in zip(captured, layer(PLAIN, x, router, w), strict=True):
            assert_matches(a.cpu(), b)


# --------------------------------------------------------------------------- compiled for the H200, without one


def sm90_report() -> list[dict]:
    """The fp8 kernels compiled for sm90 through their launchers at the real 26B-A4B shapes (1 and 64 canvas rows;
    the expert GEMMs at 64): what each compiled kernel uses, and whether its dots are e4m3 wgmma."""
    from tests import sm90
    from worker.ops.triton import moe as tmoe

    H, E_, K, INTER, DENSE = 2816, 128, 8, 704, 2112
    f8, bf16 = torch.float8_e4m3fn, torch.bfloat16

    def w(*shape):
        return torch.empty(shape, dtype=f8), torch.empty((*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128)))

    with sm90.compiling() as compiled:
        for N in (256, 16384):
            x = torch.empty((N, H), dtype=bf16)
            tfp8.linear_fp8(x, *w(4096, H))  # the sliding layers' q_proj
            tfp8.linear_fp8(torch.empty((N, DENSE), dtype=bf16), *w(H, DENSE))  # the dense down projection
            tfp8.gate_up_gelu_fp8(x, *w(DENSE, H), *w(DENSE, H))
        aligned = tmoe.moe_align(torch.zeros((16384, K), dtype=torch.int32), E_, tmoe.BLOCK_M)
        act = tfp8.moe_gate_up_fp8(x, *w(E_, 2 * INTER, H), *aligned, K)
        tfp8.moe_down_fp8(act, *w(E_, H, INTER), *aligned, 16384, K)
    return [c for c in compiled if not c["kernel"].startswith("_align")]


def test_the_fp8_kernels_compile_for_sm90_to_fp8_wgmma_without_spills():
    from tests import sm90

    report = sm90.report_of("tests.test_fp8", "sm90_report")
    assert [r["kernel"] for r in report] == ["_linear_fp8_kernel", "_linear_fp8_kernel", "_gate_up_gelu_kernel"] * 2 \
        + ["_gate_up_kernel", "_down_kernel"]
    for r in report:
        assert r["shared"] <= sm90.SHARED_LIMIT and r["local"] + r["stack"] == 0 and r["registers"] <= 255, r
        assert r["wgmma"] and r["fp8_wgmma"] and r["async_loads"] > 0, r


def test_the_fp8_ops_cost_their_weights_at_one_byte_plus_their_scales():
    """worker/ops/cost.py: what bench/step_cost.py and bench/kernels.py count for the fp8 GEMMs."""
    from worker.ops.cost import COSTS

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 256, generator=g).to(torch.bfloat16)
    w = weights(g, 384, 256)
    flops, read, written = COSTS["linear_fp8"]((x, *w), PLAIN["linear_fp8"](x, *w))
    assert flops == 2 * 40 * 256 * 384 and written == 40 * 384 * 2
    assert read == 40 * 256 * 2 + 384 * 256 + 3 * 2 * 4  # x, 1-byte weights, 3 x 2 float32 scales
    aligned = PLAIN["moe_align"](torch.tensor([[0, 2]] * 5, dtype=torch.int32), E, BLOCK)  # experts 0 and 2 hit
    w_gu = weights(g, E, 64, 256)
    act = torch.empty(aligned[0].shape[0], 32, dtype=torch.bfloat16)
    fp8_cost = COSTS["moe_gate_up_fp8"]((x[:5], *w_gu, *aligned, 2), act)
    bf16_cost = COSTS["moe_gate_up"]((x[:5], fp8.dequantize(*w_gu, torch.bfloat16), *aligned, 2), act)
    assert fp8_cost[0] == bf16_cost[0]
    assert bf16_cost[1] - fp8_cost[1] == 2 * (64 * 256 - 1 * 2 * 4)  # two experts: half the weight bytes, + scales


# ------------------------------------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def models():
    from worker.loading import load_model

    return {kind: load_model(str(TEXT), device="cpu", dtype="bfloat16", quantization=kind)[0]
            for kind in ("none", "fp8")}


def test_an_fp8_load_stores_projections_and_experts_once_as_float8(models):
    from worker.quantize import is_quantized, weight_bytes

    model = models["fp8"]
    for d, e in zip(model.model.decoder.layers, model.model.encoder.language_model.layers, strict=True):
        for module, name in ((d.self_attn.q_proj, "weight"), (d.self_attn.o_proj, "weight"),
                             (d.mlp.down_proj, "weight"), (d.experts, "gate_up_proj"), (d.experts, "down_proj")):
            w = fp8.weight_of(module, name)
            assert isinstance(w, fp8.Fp8Weight) and w.weight.dtype == torch.float8_e4m3fn, (module, name)
        # encoder and decoder layers share their weights: one quantized copy and one set of scales
        assert e.experts.gate_up_proj is d.experts.gate_up_proj
        assert e.experts.gate_up_proj_fp8_scale is d.experts.gate_up_proj_fp8_scale
        assert e.self_attn.q_proj.weight_fp8_scale is d.self_attn.q_proj.weight_fp8_scale
        assert d.router.proj.weight.dtype == torch.bfloat16  # the router stays in the model dtype
    head = model.lm_head.weight
    assert head.dtype == torch.bfloat16 and head is model.model.decoder.embed_tokens.weight  # tied, unquantized
    assert not is_quantized(model)  # not a torchao model: the engine runs our ops and may capture graphs
    layers = [weight_bytes(m.model.decoder.layers) for m in (models["none"], models["fp8"])]
    print(f"decoder layers: bf16 {layers[0] / 1e6:.2f} MB, fp8 {layers[1] / 1e6:.2f} MB")
    assert layers[1] < 0.55 * layers[0]  # 1 byte a weight (plus scales) where bf16 takes 2; norms stay bf16


def test_one_decoder_pass_on_fp8_weights_agrees_with_bf16(models):
    """Our decoder forward over the same cache state and canvas, fp8 weights against bf16 weights."""
    from worker.model_runner import ModelRunner

    g = torch.Generator().manual_seed(0)
    B, L = 4, models["none"].config.canvas_length
    prompts = torch.randint(9, 2048, (B, 40), generator=g)
    prompts[:, 0] = 2
    canvas = torch.randint(0, 2048, (B, L), generator=g)
    logits = []
    with torch.inference_mode():
        for kind in ("none", "fp8"):
            runner = ModelRunner(models[kind], max_batch=B, max_context=256)
            runner.encode(list(range(B)), prompts.tolist(), "prompt")
            hidden = runner.decode(canvas, torch.zeros((B, L, runner.hidden_size), dtype=runner.dtype))
            logits.append(models[kind].lm_head(hidden).float())
    agree = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean().item()
    rel = ((logits[0] - logits[1]).norm() / logits[0].norm()).item()
    print(f"fp8 vs bf16, one decoder pass over {B} x {L} positions: argmax {agree:.1%} identical, relative logit "
          f"error {rel:.4f}")
    assert agree >= 0.95 and rel < 0.05, (agree, rel)


def test_the_engine_decodes_fp8_weights(models):
    from protocol.contract import default_sampling
    from worker.engine import Engine, EngineConfig
    from worker.types import DoneEvent, EngineRequest

    model = models["fp8"]
    engine = Engine(model, EngineConfig(max_batch=2, max_context=256, sampler="fast"))
    done = {rid: e.token_ids for rid, e in engine.complete(
        EngineRequest(f"r{i}", [2, 40 + i, 300, 500 + 7 * i, 900],
                      default_sampling({}, seed=100 + i, max_new_tokens=128, max_denoising_steps=12))
        for i in range(2)).items() if isinstance(e, DoneEvent)}
    assert sorted(done) == ["r0", "r1"] and all(len(t) == 128 for t in done.values())  # two canvases each
    assert all(len(set(t)) > 10 for t in done.values())  # text, not one token repeated


def test_the_realscale_builder_quantizes_fp8_one_layer_at_a_time():
    """bench/engine.py --realscale --quantization fp8 (the GPU run's builder) on a tiny copy of the architecture: the
    encoder layers get the decoder layers' float8 weights and their scales."""
    from bench.engine import build_realscale
    from protocol.contract import default_sampling
    from worker.engine import Engine, EngineConfig
    from worker.types import DoneEvent, EngineRequest

    model, _ = build_realscale("tiny", torch.device("cpu"), "fp8")
    for d, e in zip(model.model.decoder.layers, model.model.encoder.language_model.layers, strict=True):
        for name in ("gate_up_proj", "down_proj"):
            dw, ew = fp8.weight_of(d.experts, name), fp8.weight_of(e.experts, name)
            assert isinstance(ew, fp8.Fp8Weight) and ew.weight is dw.weight and ew.scale is dw.scale
        assert isinstance(fp8.weight_of(e.self_attn.o_proj), fp8.Fp8Weight)
    engine = Engine(model, EngineConfig(max_batch=1, max_context=512, sampler="fast"))
    done = [e for e in engine.complete([EngineRequest("q", [2, 10, 20, 30], default_sampling(
        {}, seed=0, max_denoising_steps=2))]).values() if isinstance(e, DoneEvent)]
    assert len(done) == 1 and len(done[0].token_ids) == 256
