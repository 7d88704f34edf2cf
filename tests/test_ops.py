"""Our fused ops (their plain-torch CPU implementations) against transformers' DiffusionGemma modules, at the real
26B-A4B config's shapes in bfloat16 (H 2816, 16 heads, sliding 8 x 256 and global 2 x 512 KV heads with values =
keys, 128 experts top-8), and a whole decoder forward of ours against transformers' decoder in float32."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bench.step_cost import CONFIGS
from worker.model_runner import Block, ModelRunner
from worker.ops.registry import PLAIN

ops = SimpleNamespace(**PLAIN)
EPS = 1e-6


def decoder_model(config: str, dtype: torch.dtype, canvas: int, layers=("sliding_attention", "full_attention"),
                  vocab: int = 1024, seed: int = 0):
    """A random DiffusionGemma of `config`'s shapes with the given layers (encoder layers dropped: never run)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, Gemma4VisionConfig

    text = dict(CONFIGS[config], vocab_size=vocab, num_hidden_layers=len(layers), layer_types=list(layers))
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16).to_dict()
    cfg = DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=canvas)
    torch.set_default_dtype(dtype)
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(cfg)
    torch.set_default_dtype(torch.float32)
    model.model.encoder.language_model.layers = torch.nn.ModuleList()
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # norms and scales near 1 but not 1: they must be applied
            if p.dim() == 3:  # experts: one random matrix, rotated differently for each (fast at 128 x 4M)
                base = torch.randn(p.shape[1:], generator=g) * 0.02
                for e in range(p.shape[0]):
                    p[e] = base.roll(17 * e + 1, dims=-1)
            else:
                p.normal_(0.0, 0.02, generator=g) if p.dim() == 2 else p.uniform_(1.0, 1.2, generator=g)
        for mod in model.modules():
            if mod.__class__.__name__.endswith("RotaryEmbedding"):
                for bn, bv in mod.__class__(mod.config).named_buffers():
                    getattr(mod, bn).copy_(bv)
            if hasattr(mod, "scalar_embed_scale"):
                mod.embed_scale.fill_(mod.scalar_embed_scale)
            if hasattr(mod, "layer_scalar"):
                mod.layer_scalar.fill_(0.9)
    model.lm_head.weight = model.model.decoder.embed_tokens.weight
    return model.eval()


@pytest.fixture(scope="module")
def real():
    torch.manual_seed(0)
    return decoder_model("real", torch.bfloat16, canvas=32)


def hidden(n: int, H: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn((n, H), generator=torch.Generator().manual_seed(seed)).to(dtype)


@torch.inference_mode()
def test_norm_ops_are_the_layers_own_norms_bit_for_bit(real):
    layer = real.model.decoder.layers[0]
    H = real.config.text_config.hidden_size
    h, a, m, e = (hidden(48, H, s) for s in range(4))
    x = hidden(48, H, 9) * 30  # not unit scale
    assert torch.equal(ops.rms_norm(x, layer.input_layernorm.weight, EPS), layer.input_layernorm(x))
    assert torch.equal(ops.rms_norm(x, None, EPS), layer.router.norm(x))

    h2, x_mlp, x_moe, x_router = ops.post_attention(h, a, layer.post_attention_layernorm.weight,
                                                    layer.pre_feedforward_layernorm.weight,
                                                    layer.pre_feedforward_layernorm_2.weight, layer.router.scale, EPS,
                                                    H ** -0.5)
    ref_h2 = h + layer.post_attention_layernorm(a)
    assert torch.equal(h2, ref_h2)
    assert torch.equal(x_mlp, layer.pre_feedforward_layernorm(ref_h2))
    assert torch.equal(x_moe, layer.pre_feedforward_layernorm_2(ref_h2))
    assert torch.equal(x_router, layer.router.norm(ref_h2) * layer.router.scale * layer.router.scalar_root_size)

    k = real.config.text_config.top_k_experts
    outs = torch.stack([hidden(48, H, 20 + j) for j in range(k)], dim=1)  # (N, k, H) expert outputs
    weights = torch.rand((48, k), generator=torch.Generator().manual_seed(3))
    nxt = real.model.decoder.layers[1].input_layernorm.weight
    out, x_next = ops.ffn_combine(h2, m, outs, weights, layer.post_feedforward_layernorm_1.weight,
                                  layer.post_feedforward_layernorm_2.weight, layer.post_feedforward_layernorm.weight,
                                  layer.layer_scalar, nxt, EPS)
    experts = (outs * weights[..., None]).sum(dim=1).to(h.dtype)  # transformers' grouped_mm weighting and sum
    ref = h2 + layer.post_feedforward_layernorm(
        layer.post_feedforward_layernorm_1(m) + layer.post_feedforward_layernorm_2(experts))
    ref = ref * layer.layer_scalar
    assert torch.equal(out, ref)
    assert torch.equal(x_next, real.model.decoder.layers[1].input_layernorm(ref))


@torch.inference_mode()
def test_gate_up_gelu_is_the_mlp_and_the_self_conditioning_block(real):
    layer, sc = real.model.decoder.layers[0], real.model.decoder.self_conditioning
    x = hidden(40, real.config.text_config.hidden_size, 5)
    mlp = layer.mlp
    ours = F.linear(ops.gate_up_gelu(x, mlp.gate_proj.weight, mlp.up_proj.weight), mlp.down_proj.weight)
    assert torch.equal(ours, mlp(x))
    ids = torch.randint(0, real.config.text_config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    signal = F.linear(ops.gate_up_gelu(ops.rms_norm(x, sc.pre_norm.weight, EPS), sc.gate_proj.weight,
                                       sc.up_proj.weight), sc.down_proj.weight)
    embed = real.model.decoder.embed_tokens
    h, x0 = ops.embed_condition(ids, embed.weight, float(embed.embed_scale), signal, layer.input_layernorm.weight, EPS)
    ref = sc(embed(ids), x)
    assert torch.equal(h, ref)
    assert torch.equal(x0, layer.input_layernorm(ref))


class _Cache:
    """What transformers' decoder attention reads: each layer's cached keys and values (read-only)."""

    is_compileable = False

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.layers = [SimpleNamespace(keys=k, values=v) for k, v in zip(keys, values, strict=True)]


@pytest.mark.parametrize("layer_index", [0, 1], ids=["sliding-8x256", "global-2x512-k_eq_v"])
@torch.inference_mode()
def test_the_attention_ops_match_the_attention_module(real, layer_index):
    """q/k/v GEMMs + qk_norm_rope_store + attention + o GEMM == DiffusionGemmaDecoderTextAttention, and the pool
    then holds exactly the keys and values the module appended to its cache."""
    attn = real.model.decoder.layers[layer_index].self_attn
    kind = real.config.text_config.layer_types[layer_index]
    B, L, H, held = 2, 32, real.config.text_config.hidden_size, 40
    kv, D = attn.k_proj.weight.shape[0] // attn.head_dim, attn.head_dim
    g = torch.Generator().manual_seed(layer_index)
    past_k = torch.randn((B, kv, held, D), generator=g).to(torch.bfloat16)
    past_v = torch.randn((B, kv, held, D), generator=g).to(torch.bfloat16)
    x = torch.randn((B, L, H), generator=g).to(torch.bfloat16)
    positions = torch.tensor([[100 + j for j in range(L)], [7 + j for j in range(L)]])
    rotary = real.model.decoder.rotary_emb
    appended = {}
    original = attn.append_to_cache
    attn.append_to_cache = lambda cache, k, v: (appended.update(k=k, v=v), original(cache, k, v))[1]
    try:
        ref, _ = attn(x, rotary(x, positions, kind), None, cache=_Cache([past_k] * 2, [past_v] * 2))
    finally:
        del attn.append_to_cache

    cap = held + L + 8
    k_pool = torch.zeros((3, kv, cap, D), dtype=torch.bfloat16)
    v_pool = torch.zeros_like(k_pool)
    slots = torch.tensor([2, 0])  # rows need not sit in their own slots
    k_pool[slots, :, :held], v_pool[slots, :, :held] = past_k, past_v
    flat = x.view(B * L, H)
    q = ops.qk_norm_rope_store(F.linear(flat, attn.q_proj.weight), F.linear(flat, attn.k_proj.weight),
                               None if attn.v_proj is None else F.linear(flat, attn.v_proj.weight),
                               attn.q_norm.weight, attn.k_norm.weight, positions,
                               getattr(rotary, f"{kind}_inv_freq"), getattr(rotary, f"{kind}_attention_scaling"),
                               k_pool, v_pool, slots, torch.full((B,), held), EPS)
    assert torch.equal(k_pool[slots, :, held:held + L], appended["k"])
    assert torch.equal(v_pool[slots, :, held:held + L], appended["v"])
    assert k_pool[1].abs().sum() == 0  # nothing written outside the rows' slots
    out = ops.attention(q, k_pool, v_pool, slots, torch.full((B,), held + L), torch.full((B,), held), False, 0, 1.0)
    ours = F.linear(out.view(B * L, -1), attn.o_proj.weight).view(B, L, H)
    # sdpa over a concatenation vs over the pool slice: the same math in another order; bf16 outputs agree to a
    # couple of units in the last place of the largest value
    torch.testing.assert_close(ours, ref, rtol=0, atol=ref.abs().max().item() / 64)


@torch.inference_mode()
def test_the_moe_ops_match_the_router_and_the_experts(real):
    layer = real.model.decoder.layers[0]
    H = real.config.text_config.hidden_size
    E, k = layer.experts.num_experts, real.config.text_config.top_k_experts
    x = hidden(48, H, 11)
    router_in = layer.router.norm(x) * layer.router.scale * layer.router.scalar_root_size
    weights, ids = ops.moe_route(router_in, layer.router.proj.weight, layer.router.per_expert_scale, k)
    _, ref_weights, ref_ids = layer.router(x)
    assert torch.equal(ids.long(), ref_ids)
    assert torch.equal(weights, ref_weights)

    experts_in = layer.pre_feedforward_layernorm_2(x)
    refs = {}
    for impl in ("eager", "grouped_mm"):
        layer.experts.config._experts_implementation = impl
        refs[impl] = layer.experts(experts_in, ref_ids, ref_weights)
    for block in (1, 64):
        sorted_ids, block_expert, num_padded = ops.moe_align(ids, E, block)
        act = ops.moe_gate_up(experts_in, layer.experts.gate_up_proj, sorted_ids, block_expert, num_padded, k)
        outs = ops.moe_down(act, layer.experts.down_proj, sorted_ids, block_expert, num_padded, 48, k)
        ours = (outs * weights[..., None]).sum(dim=1).to(x.dtype)  # as ffn_combine sums them
        for ref in refs.values():
            # per-expert GEMMs grouped otherwise: bf16 outputs agree to a couple of units in the last place of the
            # largest value
            torch.testing.assert_close(ours, ref, rtol=0, atol=ref.abs().max().item() / 64)


def test_moe_align_groups_pairs_by_expert_in_whole_blocks():
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [2, 3]], dtype=torch.int32)  # expert 3 has 4 pairs
    sorted_ids, block_expert, num_padded = ops.moe_align(ids, 5, 2)
    sentinel = ids.numel()
    assert num_padded.tolist() == [2 + 2 + 2 + 4]  # experts 0, 1, 2, 3 -> padded to 2, 2, 2, 4
    assert sorted_ids[:10].tolist() == [1, 4, 3, sentinel, 6, sentinel, 0, 2, 5, 7]
    assert block_expert[:5].tolist() == [0, 1, 2, 3, 3]
    assert (block_expert[5:] == -1).all() and (sorted_ids[10:] == sentinel).all()


@torch.inference_mode()
def test_our_decoder_forward_is_transformers_decoder_in_float32():
    """The whole decoder (self-conditioning, 3 layers of both kinds, final norm) over rows holding different cache
    lengths, each row against transformers' decoder run alone on its own cache."""
    model = decoder_model("tiny", torch.float32, canvas=32,
                          layers=("sliding_attention", "full_attention", "sliding_attention"))
    runner = ModelRunner(model, max_batch=3, max_context=256)
    B, L, H = 3, 32, model.config.text_config.hidden_size
    totals = [40, 150, 7]  # the second row's sliding layers hold window - 1 = 95
    g = torch.Generator().manual_seed(4)
    pool = runner.pool
    for s, t in enumerate(totals):
        pool.total[s] = t
        for i, kind in enumerate(pool.layer_types):
            n = pool.held(s, kind)
            pool.keys[i][s, :, :n].normal_(generator=g)
            pool.values[i][s, :, :n].normal_(generator=g)
    canvas = torch.randint(0, 1024, (B, L), generator=g)
    logits = torch.randn((B, L, 1024), generator=g)
    embed = model.model.decoder.embed_tokens
    soft = torch.softmax(logits, -1) @ embed.weight * embed.embed_scale
    block = Block.empty(B, L, pool.kinds, "cpu", (H, torch.float32))
    block.ids.copy_(canvas)
    block.soft.copy_(soft)
    runner._fill(block, B, [0, 1, 2], [])
    keys = [k.clone() for k in pool.keys]  # before the step writes the canvas's keys after them
    values = [v.clone() for v in pool.values]
    ours = runner.decoder_forward(block)
    for s, t in enumerate(totals):
        held = [pool.held(s, kind) for kind in pool.layer_types]
        cache = _Cache([k[s:s + 1, :, :n] for k, n in zip(keys, held, strict=True)],
                       [v[s:s + 1, :, :n] for v, n in zip(values, held, strict=True)])
        ref = model.model.decoder(canvas[s:s + 1], cache=cache, self_conditioning_logits=logits[s:s + 1],
                                  decoder_position_ids=torch.arange(t, t + L)[None]).last_hidden_state
        # float32 sums in another order through three layers: agreement to ~1e-5 of values of order 1
        torch.testing.assert_close(ours[s:s + 1], ref, rtol=1e-4, atol=1e-4)
