"""Weight-only quantization (worker/quantize.py, the 24 GB-card mode).

On the CPU we run int8 through exactly the path the GPU's int4 takes: torchao's FqnToConfig naming the 3-D
expert parameters and the projections, `from_pretrained` with a TorchAoConfig, transformers' eager experts, the
engine decoding eagerly. int4's kernel (tinygemm) exists on CUDA only; its GPU run is `scripts/gpu_run.sh int4`
(bench/engine.py --realscale --quantization int4). fp8 is ours, not torchao's: tests/test_fp8.py.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from transformers import DiffusionGemmaForBlockDiffusion

from tests.procs import Service
from training.model import decode, encode
from worker.engine import Engine, EngineConfig
from worker.loading import load_model
from worker.quantize import from_pretrained_kwargs, is_quantized, is_quantized_tensor, quantize_model, weight_bytes
from worker.types import DoneEvent, EngineRequest, SamplingParams

TEXT = Path(__file__).resolve().parents[1] / "models" / "text"


@pytest.fixture(scope="module")
def float_model():
    return load_model(str(TEXT), device="cpu")[0]


@pytest.fixture(scope="module")
def int8_model():
    return load_model(str(TEXT), device="cpu", quantization="int8")[0]


def test_int8_load_quantizes_experts_and_projections_once(float_model, int8_model):
    decoder, encoder = int8_model.model.decoder.layers, int8_model.model.encoder.language_model.layers
    for d, e in zip(decoder, encoder, strict=True):
        for w in (d.experts.gate_up_proj, d.experts.down_proj, d.self_attn.q_proj.weight, d.self_attn.o_proj.weight,
                  d.mlp.gate_proj.weight, d.mlp.down_proj.weight):
            assert is_quantized_tensor(w), type(w)
        # encoder and decoder layers share their weights: one quantized copy, not two
        assert e.experts.gate_up_proj is d.experts.gate_up_proj
        assert e.self_attn.q_proj.weight is d.self_attn.q_proj.weight
    assert not is_quantized_tensor(int8_model.lm_head.weight)  # the tied embedding / output head stays as it was
    assert int8_model.lm_head.weight is int8_model.model.decoder.embed_tokens.weight
    assert int8_model.config.get_text_config()._experts_implementation == "eager"
    assert is_quantized(int8_model) and not is_quantized(float_model)
    # float32 -> int8 on everything but the 2048 x 224 embedding: well under half the bytes
    ratio = weight_bytes(int8_model) / weight_bytes(float_model)
    print(f"weights: float32 {weight_bytes(float_model) / 1e6:.2f} MB, int8 {weight_bytes(int8_model) / 1e6:.2f} MB")
    assert ratio < 0.5, ratio


def test_int8_logits_stay_close_to_float32(float_model, int8_model):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(9, 2048, (4, 40), generator=g)
    prompt[:, 0] = 2
    canvas = torch.randint(0, 2048, (4, 64), generator=g)
    with torch.no_grad():
        a = decode(float_model, canvas, encode(float_model, prompt), 40).float()
        b = decode(int8_model, canvas, encode(int8_model, prompt), 40).float()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    rel = ((a - b).norm() / a.norm()).item()
    print(f"int8 vs float32, one decoder pass over 4 x 64 positions: argmax {agree:.1%} identical, "
          f"relative logit error {rel:.4f}")
    assert agree >= 0.97 and rel < 0.03, (agree, rel)


def test_the_engine_decodes_quantized_weights_eagerly(int8_model):
    torch.set_num_threads(1)
    engine = Engine(int8_model, EngineConfig(max_batch=4, max_context=256, sampler="fast"))
    assert engine.quantized and engine.decode_mode == "eager"  # "auto" never captures a quantized model
    gc = int8_model.generation_config
    done = {rid: e.token_ids for rid, e in engine.complete(
        EngineRequest(f"r{i}", [2, 40 + i, 300, 500 + 7 * i, 900], SamplingParams(
            max_new_tokens=128, max_denoising_steps=gc.max_denoising_steps, entropy_bound=0.1, t_min=0.4, t_max=0.8,
            stability_threshold=1, confidence_threshold=0.005, seed=100 + i, eos_token_ids=()))
        for i in range(4)).items() if isinstance(e, DoneEvent)}
    assert sorted(done) == ["r0", "r1", "r2", "r3"]
    assert all(len(t) == 128 for t in done.values())
    assert all(len(set(t)) > 10 for t in done.values())  # text, not one token repeated


def test_quantizing_in_memory_equals_quantizing_on_load(int8_model):
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(TEXT).eval()
    quantize_model(model, "int8")
    d, e = model.model.decoder.layers[0], model.model.encoder.language_model.layers[0]
    assert is_quantized_tensor(d.experts.down_proj) and e.experts.down_proj is d.experts.down_proj
    assert weight_bytes(model) == weight_bytes(int8_model)
    ids = torch.tensor([[2, 17, 300, 1200]])
    with torch.no_grad():  # not inference_mode: torchao's tensors need version counters
        torch.manual_seed(3)
        a = model.generate(ids, max_new_tokens=64).sequences
        torch.manual_seed(3)
        b = int8_model.generate(ids, max_new_tokens=64).sequences
    assert torch.equal(a, b)


def test_cuda_only_kinds_refuse_a_cpu_with_the_reason():
    with pytest.raises(ValueError, match="CUDA only; use int8 on a CPU"):
        from_pretrained_kwargs("int4", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown quantization"):
        from_pretrained_kwargs("int3", torch.device("cpu"))


def test_fp8_is_ours_a_plain_load_then_quantized_and_runs_on_a_cpu_too():
    """No torchao config: the checkpoint loads in the model dtype and worker/fp8.py quantizes it (tests/test_fp8.py);
    on a CPU the fp8 ops run their plain-torch reference."""
    assert from_pretrained_kwargs("fp8", torch.device("cpu")) == {}


def test_a_worker_serves_quantized_weights_and_refuses_what_cannot_run(tmp_path):
    svc = Service({"text": TEXT}, tmp_path)
    try:
        svc.start_gateway()
        bad = svc.start_worker("text", quantization="int4")  # CPU worker: int4 has no CPU kernel
        assert bad.proc.wait(timeout=120) != 0
        assert "CUDA only" in bad.log() and "Traceback" not in bad.log()[-400:], bad.log()[-2000:]
        worker = svc.start_worker("text", quantization="int8")
        svc.wait_ready()
        r = httpx.post(svc.url + "/generate", json={"prompt": "And God said", "max_new_tokens": 64, "seed": 1},
                       timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["text"].strip()
        assert "int8 weights" in worker.log()
    finally:
        svc.close()


def test_the_realscale_builder_quantizes_one_layer_at_a_time():
    """bench/engine.py --realscale --quantization: the GPU run's builder, on a tiny copy of the architecture."""
    from bench.engine import build_realscale

    torch.set_num_threads(1)
    model, info = build_realscale("tiny", torch.device("cpu"), "int8")
    float_model, _ = build_realscale("tiny", torch.device("cpu"), "none")
    for d, e in zip(model.model.decoder.layers, model.model.encoder.language_model.layers, strict=True):
        assert is_quantized_tensor(d.experts.gate_up_proj) and is_quantized_tensor(d.self_attn.o_proj.weight)
        assert e.experts.gate_up_proj is d.experts.gate_up_proj and e.mlp.up_proj.weight is d.mlp.up_proj.weight
    # float32 -> int8 text layers (the scales add a little); the embedding and vision stub stay float32
    assert weight_bytes(model.model.decoder.layers) < 0.3 * weight_bytes(float_model.model.decoder.layers)
    assert info["experts_implementation"] == "eager"
    engine = Engine(model, EngineConfig(max_batch=2, max_context=512, sampler="fast"))
    done = [e for e in engine.complete([EngineRequest("q", [2, 10, 20, 30], SamplingParams(
        max_new_tokens=256, max_denoising_steps=4, entropy_bound=0.1, t_min=0.4, t_max=0.8, stability_threshold=1,
        confidence_threshold=0.005, seed=0))]).values() if isinstance(e, DoneEvent)]
    assert len(done) == 1 and len(done[0].token_ids) == 256
