"""The Triton mixture-of-experts kernels (worker/ops/triton/moe.py) against their plain-torch specs (PLAIN).

On a CPU the kernels run under TRITON_INTERPRET=1 (set here before triton is imported). Small shapes: E = 8
experts, k = 2 or 3, layout block 16, N from 1 to 40 tokens, H and I multiples of 16 and sizes that need masking.
On a GPU, `TRITON_INTERPRET=0 pytest tests/test_triton_moe.py` runs the same comparisons on the compiled kernels
(the spec on the CPU), and two more: no host sync, and the four kernels captured and replayed as a CUDA graph.

Tolerances. Both sides accumulate in float32, in different orders: the error of a float32 sum of <= 160 terms is
~1e-6 of the sum of the terms' magnitudes, so float32 gets rtol 1e-5 with an absolute floor of 1e-5 x the output's
scale (outputs near zero come from cancellation). bfloat16: the kernels repeat each of the spec's roundings, so a
value differs only where that float32 difference flips a rounding (one ulp, <= 2^-7 relative), which needs the
float32 value within ~1e-6 of a rounding boundary; GELU and the product can carry two such flips: rtol 2^-6
(a few ulps), the same absolute floor, and at most 1% of the values not bit-identical (measured: 0 to 0.01%).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from worker.ops.registry import PLAIN  # noqa: E402
from worker.ops.triton import moe as tmoe  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
needs_kernels = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                   reason="TRITON_INTERPRET=0 and no CUDA device to run the kernels on")
needs_cuda = pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                                reason="a CUDA device and TRITON_INTERPRET=0")

E = 8
BLOCK = 16  # the layout block in tests (the interpreter runs one program per block x tile)
DTYPES = [torch.float32, torch.bfloat16]
MOE_OPS = ("moe_route", "moe_align", "moe_gate_up", "moe_down")


def on_device(fn):
    """fn run on DEVICE with CPU tensors in and out (the spec runs on the CPU)."""
    def move(value, device):
        if isinstance(value, tuple):
            return tuple(move(v, device) for v in value)
        return value.to(device) if isinstance(value, torch.Tensor) else value

    def call(*args, **kwargs):
        return move(fn(*move(args, DEVICE), **kwargs), "cpu")
    return call


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    scale = ref.float().abs().max().clamp_min(1.0)
    rtol = 1e-5 if ref.dtype == torch.float32 else 2.0**-6
    torch.testing.assert_close(ours.float(), ref.float(), rtol=rtol, atol=1e-5 * scale)
    if ref.dtype == torch.bfloat16:  # the same roundings: equal bits but where a rounding flipped
        assert (ours != ref).float().mean() <= 0.01, "more than 1% of the bf16 values differ"


def untied_router_inputs(g: torch.Generator, n: int, h: int, k: int, dtype: torch.dtype, experts: int = E
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, h), weight (E, h) whose logits (as the spec rounds them) have no near-ties among each row's top k+1:
    torch.topk orders ties arbitrarily (on the CPU not by index), the kernel gives ties to the lowest index.
    bfloat16: multiples of 1/8 and 1/32, so that every float32 sum is exact and both sides round the same logit."""
    def draw(shape, step):
        if dtype == torch.float32:
            return torch.randn(shape, generator=g)
        return torch.randint(-16, 17, shape, generator=g).float() * step
    weight = draw((experts, h), 1 / 32) / (h**0.5 if dtype == torch.float32 else 1)
    rows = []
    while sum(len(r) for r in rows) < n:
        x = draw((4 * n, h), 1 / 8)
        logits = (x.double() @ weight.double().T).to(dtype).double()
        top = logits.topk(k + 1, dim=-1).values
        rows.append(x[(top[:, :-1] - top[:, 1:]).min(dim=-1).values > 1e-3])
    return torch.cat(rows)[:n].to(dtype), weight.to(dtype)


def skewed_ids(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    """(n, k) int32 distinct experts per token: expert 0 in almost every token, expert E-1 in none."""
    scores = torch.rand((n, E), generator=g)
    scores[:, 0] += 0.9
    scores[:, E - 1] = -1.0
    return scores.topk(k, dim=-1).indices.to(torch.int32)


def uniform_ids(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    return torch.rand((n, E), generator=g).topk(k, dim=-1).indices.to(torch.int32)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,h,k", [(1, 64, 2), (17, 40, 3), (40, 80, 3)])
def test_routing_matches_the_spec(dtype, n, h, k):
    g = torch.Generator().manual_seed(n)
    x, weight = untied_router_inputs(g, n, h, k, dtype)
    scale = (torch.rand(E, generator=g) + 0.5).to(dtype)
    w_ours, ids_ours = on_device(tmoe.moe_route)(x, weight, scale, k)
    w_ref, ids_ref = PLAIN["moe_route"](x, weight, scale, k)
    assert ids_ours.dtype == torch.int32 and torch.equal(ids_ours, ids_ref)
    # float32 weights from identical (bf16: identically rounded) logits: float32 tolerance for both dtypes
    assert w_ours.dtype == torch.float32
    torch.testing.assert_close(w_ours, w_ref, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_routing_ties_go_to_the_lowest_expert_index():
    """Experts 2 and 5 (and 1 and 6) have the same router row, so their logits tie exactly for every token."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn((E, 32), generator=g)
    weight[5], weight[6] = weight[2], weight[1]
    x = torch.randn((24, 32), generator=g)
    scale = torch.ones(E)
    w_ours, ids_ours = on_device(tmoe.moe_route)(x, weight, scale, 3)
    probs = torch.softmax(x @ weight.T, dim=-1)
    top, ids = torch.sort(probs, dim=-1, descending=True, stable=True)  # equal values: lower index first
    assert (probs.topk(4, dim=-1).values.diff(dim=-1) == 0).any(), "the data must contain ties in the top k"
    assert torch.equal(ids_ours, ids[:, :3].to(torch.int32))
    torch.testing.assert_close(w_ours, top[:, :3] / top[:, :3].sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


ALIGN_CASES = [(1, 2, uniform_ids), (5, 3, uniform_ids), (23, 2, skewed_ids), (40, 3, skewed_ids)]


@needs_kernels
@pytest.mark.parametrize("n,k,make_ids", ALIGN_CASES)
def test_alignment_is_the_specs_bit_for_bit(n, k, make_ids):
    ids = make_ids(torch.Generator().manual_seed(n), n, k)
    ref = PLAIN["moe_align"](ids, E, BLOCK)
    # as the model runner calls it, then with many programs and several tiles per program (chunk order and tile
    # order both decide the stable placement)
    many_programs = on_device(tmoe._align_launch)(ids, E, BLOCK, tile=16, chunk=32)
    for ours in (on_device(tmoe.moe_align)(ids, E, BLOCK), many_programs):
        for a, b in zip(ours, ref, strict=True):
            assert a.dtype == torch.int32 and torch.equal(a, b)


@needs_kernels
def test_alignment_with_experts_that_are_not_a_power_of_two_and_empty():
    ids = torch.tensor([[4, 0], [0, 4], [2, 0], [0, 2], [4, 2]], dtype=torch.int32)  # experts 1, 3, 5 get nothing
    ref = PLAIN["moe_align"](ids, 6, BLOCK)
    assert (ref[1] == -1).any() and int(ref[2]) == 3 * BLOCK
    for a, b in zip(on_device(tmoe._align_launch)(ids, 6, BLOCK, tile=16, chunk=16), ref, strict=True):
        assert torch.equal(a, b)


# (tokens, top-k, H, I): H = 128 takes two full k-steps of the gate/up GEMM; H = 40 and 144 end in a masked step;
# I = 80 makes two column tiles of act (and two masked k-steps of the down GEMM), H = 144 two of the output
GEMM_CASES = [(1, 2, 128, 32), (17, 3, 40, 80), (40, 3, 144, 48)]


def layout(n: int, k: int) -> tuple[torch.Tensor, ...]:
    ids = skewed_ids(torch.Generator().manual_seed(100 + n), n, k)
    return PLAIN["moe_align"](ids, E, BLOCK)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,h,inter", GEMM_CASES)
def test_gate_up_matches_the_spec_padding_rows_included(dtype, n, k, h, inter):
    g = torch.Generator().manual_seed(n)
    x = torch.randn((n, h), generator=g).to(dtype)
    w = (torch.randn((E, 2 * inter, h), generator=g) / h**0.5).to(dtype)
    aligned = layout(n, k)
    ours = on_device(tmoe.moe_gate_up)(x, w, *aligned, k)
    ref = PLAIN["moe_gate_up"](x, w, *aligned, k)
    assert_close(ours, ref)
    padding = (aligned[0] == n * k)
    assert padding.any() and (ours[padding] == 0).all()


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,h,inter", GEMM_CASES)
def test_down_writes_every_pair_in_token_order(dtype, n, k, h, inter):
    g = torch.Generator().manual_seed(n)
    aligned = layout(n, k)
    act = torch.randn((aligned[0].shape[0], inter), generator=g)
    act[aligned[0] == n * k] = 0.0  # as moe_gate_up leaves them
    act = act.to(dtype)
    w = (torch.randn((E, h, inter), generator=g) / inter**0.5).to(dtype)
    ours = on_device(tmoe.moe_down)(act, w, *aligned, n, k)
    ref = PLAIN["moe_down"](act, w, *aligned, n, k)
    assert ours.shape == (n, k, h)
    assert_close(ours, ref)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_four_kernels_chained_give_the_specs_expert_outputs(dtype):
    n, k, h, inter = 29, 3, 48, 32
    g = torch.Generator().manual_seed(5)
    x, router = untied_router_inputs(g, n, h, k, dtype)
    scale = (torch.rand(E, generator=g) + 0.5).to(dtype)
    w_gu = (torch.randn((E, 2 * inter, h), generator=g) / h**0.5).to(dtype)
    w_down = (torch.randn((E, h, inter), generator=g) / inter**0.5).to(dtype)

    def chain(ops) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = ops["moe_route"](x, router, scale, k)
        aligned = ops["moe_align"](ids, E, BLOCK)
        act = ops["moe_gate_up"](x, w_gu, *aligned, k)
        return weights, ops["moe_down"](act, w_down, *aligned, n, k)

    ours = chain({name: on_device(getattr(tmoe, name)) for name in MOE_OPS})
    ref = chain(PLAIN)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-6)
    assert_close(ours[1], ref[1])


def test_inputs_the_kernels_cannot_take_are_refused_clearly():
    aligned = PLAIN["moe_align"](torch.zeros((3, 2), dtype=torch.int32), E, 8)
    with pytest.raises(AssertionError, match="power of two >= 16"):
        tmoe.moe_gate_up(torch.zeros((3, 16)), torch.zeros((E, 32, 16)), *aligned, 2)
    assert tmoe.BLOCK_M >= 16 and tmoe.BLOCK_M & (tmoe.BLOCK_M - 1) == 0
    with pytest.raises(ValueError, match="torch.bfloat16 and torch.float32"):
        tmoe.moe_route(torch.zeros((3, 16), dtype=torch.bfloat16), torch.zeros((E, 16)), torch.ones(E), 2)
    with pytest.raises(ValueError, match="torch.float16"):
        tmoe.moe_down(torch.zeros((16, 16), dtype=torch.float16), torch.zeros((E, 16, 16), dtype=torch.float16),
                      *PLAIN["moe_align"](torch.zeros((1, 1), dtype=torch.int32), E, 16), 1, 1)


@needs_cuda
def test_the_chain_never_syncs_with_the_host_and_replays_as_a_cuda_graph():
    """At the real E = 128, k = 8 and block BLOCK_M: one eager run under the sync debugger (any host sync raises),
    then the chain captured once and replayed on new tokens, whose routing (and so layout) differs."""
    n, k, h, inter, experts = 256, 8, 256, 128, 128
    g = torch.Generator().manual_seed(7)
    bf16 = torch.bfloat16
    router = untied_router_inputs(g, 1, h, k, bf16, experts)[1]
    inputs = [untied_router_inputs(g, n, h, k, bf16, experts)[0] for _ in range(2)]
    weights = [router, (torch.rand(experts, generator=g) + 0.5).to(bf16),
               (torch.randn((experts, 2 * inter, h), generator=g) / h**0.5).to(bf16),
               (torch.randn((experts, h, inter), generator=g) / inter**0.5).to(bf16)]

    def chain(ops, x, router, scale, w_gu, w_down):
        weights, ids = ops["moe_route"](x, router, scale, k)
        aligned = ops["moe_align"](ids, experts, tmoe.BLOCK_M)
        return weights, ids, ops["moe_down"](ops["moe_gate_up"](x, w_gu, *aligned, k), w_down, *aligned, n, k)

    ops = {name: getattr(tmoe, name) for name in MOE_OPS}
    static = [t.cuda() for t in (inputs[0], *weights)]
    chain(ops, *static)  # compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        chain(ops, *static)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain(ops, *static)
    for x in inputs[::-1]:
        static[0].copy_(x)
        graph.replay()
        ref = chain(PLAIN, x, *weights)
        assert torch.equal(captured[1].cpu(), ref[1])
        torch.testing.assert_close(captured[0].cpu(), ref[0], rtol=1e-5, atol=1e-6)
        assert_close(captured[2].cpu(), ref[2])


# ------------------------------------------------------------------------ compiled for the H200, without one


def sm90_report() -> dict[str, dict]:
    """Compile the bf16 kernels for sm90 (no GPU needed) through the launchers at the real scale (26B-A4B; route at
    1 and 64 canvas rows, the rest at 64): what each compiled kernel uses (tests/sm90.py). Runs in a subprocess
    (the interpreter must be off before triton is imported)."""
    from tests import sm90

    N, H, E, K, INTER = 16384, 2816, 128, 8, 704  # 64 canvas rows of 26B-A4B
    bf16 = torch.bfloat16
    router, scale = torch.empty((E, H), dtype=bf16), torch.empty(E, dtype=bf16)
    x = torch.empty((N, H), dtype=bf16)
    with sm90.compiling() as compiled:
        tmoe.moe_route(x[:256], router, scale, K)
        tmoe.moe_route(x, router, scale, K)
        aligned = tmoe.moe_align(torch.zeros((N, K), dtype=torch.int32), E, tmoe.BLOCK_M)
        act = tmoe.moe_gate_up(x, torch.empty((E, 2 * INTER, H), dtype=bf16), *aligned, K)
        tmoe.moe_down(act, torch.empty((E, H, INTER), dtype=bf16), *aligned, N, K)
    names = ("route_1_row", "route_64_rows", "align_count", "align_place", "gate_up", "down")
    assert [c["kernel"] for c in compiled] == ["_route_kernel", "_route_kernel", "_align_count_kernel",
                                               "_align_place_kernel", "_gate_up_kernel", "_down_kernel"]
    return dict(zip(names, compiled, strict=True))


def test_kernels_compile_for_the_h200_with_wgmma_pipelined_and_without_spills():
    from tests import sm90

    report = sm90.report_of("tests.test_triton_moe", "sm90_report", timeout=600)
    for name, r in report.items():
        assert r["shared"] <= sm90.SHARED_LIMIT and r["local"] + r["stack"] == 0 and r["registers"] <= 255, (name, r)
    for name in ("route_64_rows", "gate_up", "down"):  # the tensor-core GEMMs, their k loop software-pipelined
        assert report[name]["wgmma"] and report[name]["async_loads"] > 0, (name, report[name])
    assert report["route_1_row"]["async_loads"] > 0
