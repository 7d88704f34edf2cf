"""The engine on a tiny checkpoint (CPU, float32): the reference's tokens, batching invariance,
rows joining and leaving, templates, and no growth of live tensors."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

from worker.engine import Engine, EngineConfig
from worker.types import CanvasEvent, DoneEvent, EngineRequest, ErrorEvent, SamplingParams, StepEvent

EOS = (1, 5)


def params(seed: int, **kw) -> SamplingParams:
    base = dict(max_new_tokens=64, max_denoising_steps=8, entropy_bound=0.1, t_min=0.4, t_max=0.8,
                stability_threshold=1, confidence_threshold=0.005, seed=seed, eos_token_ids=EOS)
    base.update(kw)
    return SamplingParams(**base)


def run(engine: Engine, requests: list[EngineRequest], joins: dict[int, list[EngineRequest]] | None = None):
    """Drive the engine until idle; `joins[k]` are added before step k. Returns (final events, steps)."""
    done: dict[str, DoneEvent | ErrorEvent] = {}
    steps = 0
    for events in engine.generate(requests, joins):
        steps += 1
        done.update({e.request_id: e for e in events if isinstance(e, DoneEvent | ErrorEvent)})
    return done, steps


def reference(model, prompt: list[int], p: SamplingParams) -> list[int]:
    """transformers' generate() with the global RNG seeded as our per-request generator is."""
    torch.manual_seed(p.seed)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=p.max_new_tokens,
                         max_denoising_steps=p.max_denoising_steps, t_min=p.t_min, t_max=p.t_max,
                         sampler_config=EntropyBoundSamplerConfig(entropy_bound=p.entropy_bound),
                         stability_threshold=p.stability_threshold, confidence_threshold=p.confidence_threshold,
                         eos_token_id=list(EOS))
    tokens = []
    for t in out.sequences[0, len(prompt):].tolist():
        if t in EOS:
            break
        tokens.append(t)
    return tokens[: p.max_new_tokens]


@pytest.fixture(scope="module")
def model(tiny_model):
    torch.set_num_threads(1)
    return tiny_model[0]


def mixed_requests(tokenizer) -> list[EngineRequest]:
    texts = ["The quick brown fox", "In the beginning was the word, and the word was with the writer. The canvas",
             "x", "Pack my box with five dozen liquor jugs, then refine it in parallel"]
    settings = [dict(), dict(max_new_tokens=96, max_denoising_steps=5, entropy_bound=0.5),
                dict(max_new_tokens=40, t_min=0.1, t_max=1.5), dict(max_denoising_steps=12, stability_threshold=2)]
    return [EngineRequest(f"r{i}", tokenizer(t).input_ids, params(100 + i, **s))
            for i, (t, s) in enumerate(zip(texts, settings, strict=True))]


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_tokens_match_reference_generate_for_the_same_seed(model, tiny_model, mode):
    """`static` is the CUDA-graph path (fixed bucket shapes, full-capacity masked attention) run eagerly."""
    tokenizer = tiny_model[1]
    for req in mixed_requests(tokenizer):
        config = EngineConfig(max_batch=4, max_context=512, decode_mode=mode, sampler="exact")
        done, _ = run(Engine(model, config), [req])
        assert done[req.request_id].token_ids == reference(model, req.prompt_ids, req.params), req.request_id


@pytest.mark.parametrize("mode, sampler_mode", [("eager", "exact"), ("static", "exact"), ("eager", "fast")])
def test_batching_does_not_change_results(model, tiny_model, mode, sampler_mode):
    """Rows with different prompt lengths, parameters and canvas counts share every forward, and each
    gets exactly the tokens it gets alone (CPU float32: exact). With `static`, 3 rows run padded in a
    bucket of 4."""
    reqs = mixed_requests(tiny_model[1])
    config = dict(max_batch=4, max_context=512, sampler=sampler_mode)
    together, _ = run(Engine(model, EngineConfig(decode_mode=mode, **config)), reqs)
    canvases = set()
    for req in reqs:
        alone, _ = run(Engine(model, EngineConfig(**config)), [req])
        assert together[req.request_id].token_ids == alone[req.request_id].token_ids, req.request_id
        canvases.add(together[req.request_id].canvases)
    assert len(canvases) > 1  # the batch really mixed rows at different canvas counts


def test_committed_canvases_encode_through_the_fixed_shape_pass(model, tiny_model):
    """In static/graphs mode prompts (in chunks of one canvas) and committed canvases are encoded by the bucketed
    pass (captured on a GPU): rows from any slots, padding rows in the spare slot, sliding windows rebuilt past their
    capacity. The tokens stay exactly the reference's."""
    tok = tiny_model[1]
    long_prompt = tok("a prompt of some length " * 4).input_ids
    assert len(long_prompt) + 160 > model.config.get_text_config().sliding_window  # its sliding layers wrap
    assert len(long_prompt) > model.config.canvas_length  # its prompt takes two chunks
    reqs = [EngineRequest("long", long_prompt, params(7, max_new_tokens=160)),
            EngineRequest("short", tok("hi").input_ids, params(8, max_new_tokens=64)),
            EngineRequest("mid", tok("the middle one").input_ids, params(9, max_new_tokens=96))]
    engine = Engine(model, EngineConfig(max_batch=4, max_context=512, decode_mode="static", sampler="exact"))
    assert sorted(engine.runner.encode_buckets) == [1, 2, 4] and engine.pool.spare_slot == 4
    calls = []
    inner = engine.runner._encode_block
    engine.runner._encode_block = lambda slots, ids, what: (calls.append((what, list(slots))),
                                                            inner(slots, ids, what))[1]
    done, _ = run(engine, reqs)
    canvas_calls = [slots for what, slots in calls if what == "canvas"]
    assert canvas_calls and any(len(c) < 4 for c in canvas_calls)  # padded buckets were used
    assert engine.forwards[("canvas_encode", "static")] == len(canvas_calls)
    assert engine.forwards[("prompt_encode", "static")] == 2  # the long prompt's second chunk ran alone
    assert engine.forwards[("decoder", "static")] > 0 and ("decoder", "eager") not in engine.forwards
    for req in reqs:
        assert done[req.request_id].token_ids == reference(model, req.prompt_ids, req.params), req.request_id


def test_a_late_arrival_joins_a_running_batch_and_finishes_correctly(model, tiny_model):
    first, late = mixed_requests(tiny_model[1])[1], mixed_requests(tiny_model[1])[3]
    engine = Engine(model, EngineConfig(max_batch=4, max_context=512, sampler="exact"))
    seen_together = []
    engine.add(first)
    done = {}
    for step in range(400):
        if step == 3:
            engine.add(late)
        events = engine.step()
        rows = {e.request_id for e in events if isinstance(e, StepEvent)}
        if len(rows) == 2:
            seen_together.append(step)
        done.update({e.request_id: e for e in events if isinstance(e, DoneEvent)})
        if not engine.has_work():
            break
    assert seen_together and seen_together[0] == 3  # admitted at the very next step
    assert done[first.request_id].token_ids == reference(model, first.prompt_ids, first.params)
    assert done[late.request_id].token_ids == reference(model, late.prompt_ids, late.params)


def test_a_cancelled_row_leaves_within_one_step(model, tiny_model):
    a = EngineRequest("a", tiny_model[1]("keep going").input_ids, params(1, max_denoising_steps=200))
    b = EngineRequest("b", tiny_model[1]("cancel me").input_ids, params(2, max_denoising_steps=200))
    engine = Engine(model, EngineConfig(max_batch=4, max_context=512))
    engine.add(a)
    engine.add(b)
    for _ in range(3):
        engine.step()
    engine.cancel("b")
    events = engine.step()
    assert any(isinstance(e, ErrorEvent) and e.request_id == "b" and e.code == "cancelled" for e in events)
    assert {e.request_id for e in events if isinstance(e, StepEvent)} == {"a"}
    assert engine.active == 1 and engine.pool.total[1] == 0  # its slot is free


def test_template_positions_are_clamped_at_every_step(model, tiny_model):
    template = {0: 10, 5: 11, 31: 12}
    req = EngineRequest("t", tiny_model[1]("fill the holes").input_ids,
                        params(9, max_new_tokens=32, max_denoising_steps=10), template=template)
    engine = Engine(model, EngineConfig(max_batch=2, max_context=512))
    engine.add(req)
    steps = 0
    while engine.has_work():
        for ev in engine.step():
            if isinstance(ev, StepEvent):
                steps += 1
                assert all(ev.draft_ids[pos] == tok for pos, tok in template.items())
            for row in engine.rows:  # the noisy canvas itself is never renoised at fixed positions
                assert all(int(row.canvas[pos]) == tok for pos, tok in template.items())
    assert steps == 10


def test_too_long_requests_fail_alone(model, tiny_model):
    engine = Engine(model, EngineConfig(max_batch=2, max_context=64))
    ok = EngineRequest("ok", [2, 3, 4], params(1, max_new_tokens=32))
    too_long = EngineRequest("long", [2] * 40, params(1, max_new_tokens=64))
    done, _ = run(engine, [too_long, ok])
    assert isinstance(done["long"], ErrorEvent) and done["long"].code == "too_long"
    assert isinstance(done["ok"], DoneEvent)


def test_no_growth_of_live_tensors_across_1000_steps(model, tiny_model):
    """Rows keep joining and leaving for 1000 steps; the number of live tensors stays flat."""
    engine = Engine(model, EngineConfig(max_batch=3, max_context=512))
    tok = tiny_model[1]
    counter = 0

    def top_up():
        nonlocal counter
        while engine.active + len(engine.pending) < engine.config.max_batch:
            counter += 1
            engine.add(EngineRequest(f"r{counter}", tok(f"request {counter}").input_ids,
                                     params(counter, max_new_tokens=32 * (1 + counter % 3), max_denoising_steps=4)))

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    top_up()
    for _ in range(50):  # warm up
        engine.step()
        top_up()
    before = live_tensors()
    for _ in range(1000):
        engine.step()
        top_up()
    after = live_tensors()
    assert counter > 100  # many requests came and went
    assert after <= before + 8, (before, after)  # per-row state only: no accumulation


def test_tokens_match_every_experts_implementation_of_the_reference(tiny_checkpoint, tiny_model):
    """Our expert kernels against each of transformers' MoE implementations running generate(): the same tokens."""
    from worker.loading import load_model

    req = mixed_requests(tiny_model[1])[1]
    for impl in ("grouped_mm", "batched_mm", "eager"):
        m, _ = load_model(str(tiny_checkpoint), device="cpu", dtype="float32")
        m.set_experts_implementation(impl)  # the reference's kernels (ours ignore it)
        assert m.config.get_text_config()._experts_implementation == impl
        done, _ = run(Engine(m, EngineConfig(max_batch=2, max_context=512, sampler="exact")), [req])
        assert done[req.request_id].token_ids == reference(m, req.prompt_ids, req.params), impl


def test_finish_ends_a_running_row_as_done_with_the_tokens_kept(model, tiny_model):
    """`Engine.finish` (a stop string found above the engine) is applied between steps, like a cancel: the row leaves
    at the next step with a DoneEvent carrying its reason and the first `keep_tokens` of its tokens; the rest of the
    batch goes on; a request no longer running is left alone."""
    tok = tiny_model[1]
    a = EngineRequest("a", tok("stop me").input_ids, params(1, max_new_tokens=96, max_denoising_steps=3,
                                                            eos_token_ids=()))
    b = EngineRequest("b", tok("go on").input_ids, params(2, max_denoising_steps=200))
    engine = Engine(model, EngineConfig(max_batch=4, max_context=512))
    committed, steps = None, 0
    for events in engine.generate([a, b]):
        steps += sum(isinstance(e, StepEvent) and e.request_id == "a" for e in events)
        committed = next((e for e in events if isinstance(e, CanvasEvent) and e.request_id == "a"), None)
        if committed:
            break
    assert committed is not None and len(committed.token_ids) == 32
    engine.finish("a", "stop_string", 5)
    engine.finish("never-added", "stop_string", 1)
    events = engine.step()
    [done] = [e for e in events if e.request_id == "a"]  # nothing else of it: no step, no canvas
    assert isinstance(done, DoneEvent) and done.finish_reason == "stop_string"
    assert done.token_ids == committed.token_ids[:5]
    assert (done.canvases, done.denoising_steps, done.prompt_tokens) == (1, steps, len(a.prompt_ids))
    assert {e.request_id for e in events} == {"a", "b"} and engine.active == 1
    assert [r.request_id for r in engine.rows] == ["b"]
