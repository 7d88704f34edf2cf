"""The Triton attention kernel against its spec, `PLAIN["attention"]` (worker/ops/attention.py).

On a CPU the kernel runs under TRITON_INTERPRET=1 (set here before triton is imported). On a GPU,
`TRITON_INTERPRET=0 pytest tests/test_triton_attention.py` runs the same comparisons on the device, plus the
real-scale shapes (skipped under the interpreter). Without a GPU, the kernel is also compiled for sm90 as it is
launched for the served layers (`compile_for_sm90`, in a subprocess: tests/sm90.py), and the compiled
kernels' shared memory, registers and wgmma use are checked.

Pools are filled with NaN everywhere but the keys each row may read, so a kernel that lets a key past kv_len, a
key of another slot, or (causal) a whole tile outside the allowed range reach the output fails with NaN.

Tolerances, elementwise against the spec:
  float32: |ours - spec| <= 1e-5 (1 + |spec|). Scores are O(1) (scale = D^-1/2), so both sides round q.k and the
  softmax at float32 epsilon (6e-8) times a few hundred terms at most, summed in different orders.
  bfloat16: <= 2^-7 (1 + |spec|), two bf16 ulps at |spec| ~ 1: both round P to bf16 (2^-9 relative a term, each
  against its own running maximum, which differs between the two tilings) and round the output (half an ulp each).
And against float64 on the same (rounded) inputs: no less accurate than the spec, within a factor 2.
"""

from __future__ import annotations

import inspect
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import worker.ops  # noqa: E402, F401  (registers the ops)
from tests import sm90  # noqa: E402
from worker.ops.registry import PLAIN  # noqa: E402
from worker.ops.triton import attention as kernel  # noqa: E402
from worker.ops.triton_kernels import triton_function  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
needs_a_device = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                    reason="TRITON_INTERPRET=0 needs a GPU")
spec = PLAIN["attention"]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2.0 ** -7


def readable(L: int, n: torch.Tensor, q_start: torch.Tensor, causal: bool, window: int, capacity: int,
             tile: int = 64) -> torch.Tensor:
    """(B, capacity) bool: the keys row b's kernel may load. Causal passes load whole 64-key tiles (every BLOCK_N
    divides 64) from the one holding the first query's first allowed key to the one holding the last query."""
    t = torch.arange(capacity)[None, :]
    ok = t < n[:, None]
    if causal:
        first = q_start - window + 1 if window > 0 else torch.zeros_like(q_start)
        ok &= t >= (first.clamp(min=0) // tile * tile)[:, None]
        ok &= t < ((q_start + L + tile - 1) // tile * tile)[:, None]
    return ok


def make(B: int, L: int, Hq: int, Hkv: int, D: int, kv_len: list[int], q_start: list[int], causal: bool,
         window: int, dtype: torch.dtype, pool_dtype: torch.dtype | None = None, capacity: int | None = None,
         seed: int = 0) -> dict:
    """Inputs of one call: rows in non-contiguous, out-of-order slots of a pool with spare slots; pool entries no
    row may read are NaN (the kernel gets those pools, the spec gets the same pools with zeros there)."""
    g = torch.Generator().manual_seed(seed)
    capacity = capacity or max(kv_len) + 70
    slots = torch.tensor([2 * B - 2 * b for b in range(B)])  # e.g. 4, 2, 0 of 5 slots
    n, start = torch.tensor(kv_len), torch.tensor(q_start)
    pool_dtype = pool_dtype or dtype
    pools = [torch.randn((2 * B + 1, Hkv, capacity, D), generator=g).to(pool_dtype) for _ in range(2)]
    keep = torch.zeros((2 * B + 1, capacity), dtype=torch.bool)
    keep[slots] = readable(L, n, start, causal, window, capacity)
    poisoned = [p.masked_fill(~keep[:, None, :, None], float("nan")) for p in pools]
    clean = [p.masked_fill(~keep[:, None, :, None], 0.0) for p in pools]
    q = torch.randn((B, L, Hq, D), generator=g).to(dtype)
    args = dict(slots=slots, kv_len=n, q_start=start, causal=causal, window=window, scale=D ** -0.5)
    ours = dict(args, q=q, k_pool=poisoned[0], v_pool=poisoned[1])
    return {
        "kernel": {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in ours.items()},
        "spec": dict(args, q=q, k_pool=clean[0], v_pool=clean[1]),  # on the CPU, as the spec is everywhere else
    }


def check(inputs: dict) -> torch.Tensor:
    return compare(kernel.attention(**inputs["kernel"]), inputs["spec"])


def compare(ours: torch.Tensor, spec_inputs: dict) -> torch.Tensor:
    """The kernel's output against the spec's on the same inputs (tolerances in the module docstring)."""
    ours = ours.cpu()
    ref = spec(**spec_inputs)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.isfinite(ours).all(), "a key the row may not read reached the output"
    tol = tolerance(ref.dtype)
    err = (ours.float() - ref.float()).abs()
    worst = (err / (1 + ref.float().abs())).max().item()
    assert worst <= tol, f"max error {worst:.3g} (in units of 1 + |spec|) above {tol:.3g}"
    exact = spec(**{k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                    for k, v in spec_inputs.items()})
    ours_err = (ours.double() - exact).abs().max().item()
    spec_err = (ref.double() - exact).abs().max().item()
    assert ours_err <= 2 * spec_err + 1e-7, (ours_err, spec_err)
    return ours


# name: B, L, Hq, Hkv, D, kv_len, q_start, causal, window
CASES = {
    # decoder: bidirectional over each row's length; 64 = one whole tile, 70 and 5 end inside one
    "decoder D16 G2": (3, 5, 4, 2, 16, [70, 5, 64], [0, 0, 0], False, 0),
    # D 56 padded to 64; 12 positions x 8 heads = 96 tile rows, a tile boundary inside a position's group
    "decoder D56 G8": (2, 12, 8, 1, 56, [33, 130], [0, 0], False, 0),
    # canvas encode: causal after a cache (q_start > 0), and a prompt from 0
    "encoder causal D64 G1": (2, 9, 2, 2, 64, [59, 9], [50, 0], True, 0),
    # sliding layer: window 20 skips whole tiles before the first row's queries, causality those after the second's
    "encoder window D64 G2": (2, 10, 4, 2, 64, [150, 100], [140, 3], True, 20),
    "decoder D256 G2": (2, 6, 4, 2, 256, [40, 9], [0, 0], False, 0),
    "encoder window D256 G8": (1, 6, 8, 1, 256, [140], [134], True, 33),
    "decoder D512 G8": (2, 4, 16, 2, 512, [37, 4], [0, 0], False, 0),
    "encoder causal D512 G1": (1, 5, 2, 2, 512, [45], [40], True, 0),
}


@needs_a_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_the_spec(case, dtype):
    check(make(*CASES[case], dtype=dtype))


@needs_a_device
@pytest.mark.parametrize("q_dtype,pool_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_pool_in_another_dtype_is_read_as_the_spec_converts_it(q_dtype, pool_dtype):
    """The spec converts K/V to q's dtype (bf16 -> f32 exactly; f32 -> bf16 rounded to nearest)."""
    check(make(2, 7, 4, 2, 64, [66, 7], [59, 0], True, 16, q_dtype, pool_dtype))


@needs_a_device
def test_rows_with_no_key_to_see_get_zeros():
    """Padding rows (kv_len 0), and causal queries whose window holds no key below kv_len: zeros, as the spec."""
    padding = make(2, 4, 4, 2, 16, [0, 20], [0, 0], False, 0, torch.float32)
    out = check(padding)
    assert (out[0] == 0).all() and (out[1] != 0).any()
    # queries at key index 30..33 with window 4 see keys 27.. but kv_len is 20: nothing
    empty = make(1, 4, 2, 1, 16, [20], [30], True, 4, torch.float32)
    assert (check(empty) == 0).all()


@needs_a_device
def test_a_kv_len_past_the_capacity_reads_the_slot_only():
    """The spec's slice stops at the slot's capacity; reading on would reach the next head or slot (NaN here)."""
    check(make(2, 6, 4, 2, 16, [90, 30], [0, 0], False, 0, torch.float32, capacity=64))


@needs_a_device
def test_a_rows_result_does_not_depend_on_its_neighbours():
    batch = make(3, 8, 8, 2, 256, [50, 17, 90], [0, 0, 0], False, 0, torch.bfloat16)["kernel"]
    alone = dict(batch, q=batch["q"][1:2], slots=batch["slots"][1:2], kv_len=batch["kv_len"][1:2],
                 q_start=batch["q_start"][1:2])
    assert torch.equal(kernel.attention(**alone)[0], kernel.attention(**batch)[1])


def test_the_op_registers_this_function_with_the_specs_signature():
    assert triton_function("attention") is kernel.attention
    assert inspect.signature(kernel.attention) == inspect.signature(spec)


@needs_a_device
@pytest.mark.skipif(INTERPRET, reason="real-scale shapes: GPU only (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("layer", ["sliding", "global"])
@pytest.mark.parametrize("causal", [False, True], ids=["decoder", "encoder"])
def test_real_scale_shapes_on_the_gpu(layer, causal):
    """26B-A4B: 16 query heads; sliding 8 KV heads x 256 (window 1023), global 2 x 512; canvas 256."""
    Hkv, D, window = (8, 256, 1023) if layer == "sliding" else (2, 512, 0)
    kv_len = [1279, 300, 1024 + 256, 256]
    q_start = [n - 256 for n in kv_len] if causal else [0] * 4
    check(make(4, 256, 16, Hkv, D, kv_len, q_start, causal, window, torch.bfloat16))


@needs_a_device
@pytest.mark.skipif(INTERPRET, reason="GPU only (TRITON_INTERPRET=0)")
def test_the_op_dispatches_to_this_kernel_on_cuda():
    inputs = make(2, 8, 4, 2, 64, [70, 9], [0, 0], False, 0, torch.bfloat16)["kernel"]
    args = [inputs[name] for name in inspect.signature(spec).parameters]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = torch.ops.dgserve.attention(*args)
        torch.cuda.synchronize()
    assert "_attention_kernel" in {e.name for e in prof.events()}
    assert torch.equal(out, kernel.attention(*args))


@needs_a_device
@pytest.mark.skipif(INTERPRET, reason="GPU only (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("causal", [False, True], ids=["decoder", "encoder"])
def test_a_captured_launch_reads_new_slots_lengths_and_starts_on_replay(causal):
    """Captured once in a CUDA graph; each replay reads slots, kv_len and q_start from the device buffers."""
    def case(kv_len: list[int], seed: int) -> dict:
        q_start = [n - 16 for n in kv_len] if causal else [0, 0]
        return make(2, 16, 8, 2, 256, kv_len, q_start, causal, 40 if causal else 0, torch.bfloat16, capacity=200,
                    seed=seed)

    def swap_rows(inputs: dict) -> dict:  # the same rows, each in the other's slot
        return {k: v.flip(0) if k in ("q", "slots", "kv_len", "q_start") else v for k, v in inputs.items()}

    static = case([30, 100], seed=0)["kernel"]
    kernel.attention(**static)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel.attention(**static)
    second = case([130, 17], seed=1)
    for inputs in (case([30, 100], seed=0), {k: swap_rows(v) for k, v in second.items()}):
        for name, value in inputs["kernel"].items():
            if torch.is_tensor(value):
                static[name].copy_(value)
        graph.replay()
        compare(out, inputs["spec"])


# the served layers as the engine launches them (26B-A4B, bf16): name -> (KV heads, head dim, causal, window)
SM90_LAYERS = {
    "sliding decoder": (8, 256, False, 0),
    "sliding encoder": (8, 256, True, 1023),
    "global decoder": (2, 512, False, 0),
    "global encoder": (2, 512, True, 0),
}
SM90_STACK_LIMIT = 64  # bytes of local stack a thread: a few spilled registers, outside the K loop


def compile_for_sm90() -> dict[str, dict]:
    """Compile the kernel for sm90 exactly as `attention` launches it for each served layer; nothing runs (needs
    TRITON_INTERPRET=0, not a GPU)."""
    sm90.use_sm90_target()
    report = {}
    for name, (kv_heads, D, causal, window) in SM90_LAYERS.items():
        q = torch.empty((2, 256, 16, D), dtype=torch.bfloat16)
        pool = torch.empty((3, kv_heads, 1280, D), dtype=torch.bfloat16)
        rows = torch.zeros(2, dtype=torch.long)
        grid, args, kwargs = kernel.launch(q, pool, pool, rows, rows, rows, causal, window, 1.0, torch.empty_like(q))
        report[name] = sm90.usage(kernel._attention_kernel.warmup(*args, grid=grid, **kwargs))
    return report


def test_kernels_compile_for_sm90_within_shared_memory_and_registers():
    """The interpreter accepts what the compiler may reject (tile sizes, layouts) or compiles badly (spills):
    compile each served layer's kernel for an H100/H200 and read what the compiled kernel uses."""
    report = sm90.report_of("tests.test_triton_attention", "compile_for_sm90")
    assert set(report) == set(SM90_LAYERS)
    for name, k in report.items():
        assert k["shared"] <= sm90.SHARED_LIMIT, (name, k)
        assert k["stack"] <= SM90_STACK_LIMIT, (name, k)
        assert k["wgmma"], (name, k)

