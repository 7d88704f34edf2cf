"""Model presets and the training-side forward pieces of DiffusionGemma.

One training step is: the encoder runs once over the prompt (writing the KV cache the decoder reads), then the
decoder runs over the corrupted canvas, optionally twice (a no-grad pass whose logits become the
self-conditioning input of the second, as at inference where each step conditions on the previous step's logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType, SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DiffusionGemmaForBlockDiffusion, DynamicCache

from training.checkpoints import tiny_config
from training.split_layers import use_split_layers

# ------------------------------------------------------------------------------------------------- presets

CHECKPOINT_LIMIT_BYTES = 15_000_000  # model.safetensors must stay below this
SAFETY_BYTES = 600_000  # headroom for the safetensors header and rounding


def layer_types(n: int, full_every: int = 3) -> list[str]:
    """Gemma's pattern: (full_every - 1) sliding-window layers, then one full-attention layer; the last is full."""
    types = ["full_attention" if (i + 1) % full_every == 0 else "sliding_attention" for i in range(n)]
    types[-1] = "full_attention"
    return types


def _arch(hidden: int, layers: int, heads: int, head_dim: int, mlp: int, moe: int, experts: int, top_k: int,
          window: int, full_every: int = 3, kv_heads: int = 2, global_head_dim: int | None = None) -> dict:
    return dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, head_dim=head_dim,
        num_key_value_heads=kv_heads, num_global_key_value_heads=1, global_head_dim=global_head_dim or head_dim,
        intermediate_size=mlp, moe_intermediate_size=moe, num_experts=experts, top_k_experts=top_k,
        sliding_window=window, layer_types=layer_types(layers, full_every),
    )


# Sizes are chosen so that model.safetensors stays under 15 MB in float32 (see `param_bytes`). The sliding
# window (128) covers a whole sudoku prompt (82 tokens); text contexts go up to 160 tokens, of which the
# sliding-window layers keep the last 127, exactly as the engine's KV pool does at inference.
PRESETS: dict[str, dict[str, Any]] = {
    # ~3.35M parameters (13.4 MB in float32): depth matters more than width for constraint propagation
    "sudoku": _arch(hidden=192, layers=8, heads=4, head_dim=48, mlp=256, moe=64, experts=4, top_k=2,
                    window=128, full_every=2),
    # ~3.35M parameters (0.46M of them the 2048-token embedding, tied with the head)
    "text": _arch(hidden=224, layers=5, heads=4, head_dim=56, mlp=320, moe=64, experts=4, top_k=2, window=128),
    # CI / smoke: tiny, seconds on a CPU
    "smoke": _arch(hidden=64, layers=2, heads=2, head_dim=32, mlp=128, moe=32, experts=4, top_k=2, window=128,
                   full_every=2),
}


VISION_POSITIONS = 64  # these checkpoints never see an image: keep the (unused) vision tower's table tiny


def build_config(preset: str | dict, vocab_size: int, canvas_length: int, **overrides: Any):
    arch = dict(PRESETS[preset]) if isinstance(preset, str) else dict(preset)
    arch.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        arch["layer_types"] = layer_types(arch["num_hidden_layers"])
    config = tiny_config(vocab_size=vocab_size, canvas_length=canvas_length, **arch)
    # tiny_config's vision tower keeps transformers' default 10240-entry position table (0.65M parameters)
    config.vision_config.position_embedding_size = VISION_POSITIONS
    return config


def build_model(config, seed: int, fast: bool = True) -> DiffusionGemmaForBlockDiffusion:
    """A freshly initialized model. `fast`: the training-only speedups (dense experts, fused RMSNorm, layers
    split so that their feed-forward half can be compiled); without them the model runs transformers' own code
    paths (eager experts), which is the `--safe` fallback."""
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config)
    if fast:
        use_dense_experts(model)
        use_fused_rms_norm(model)
        use_split_layers(model)
    else:
        model.set_experts_implementation("eager")
    return model


def unique_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters once each (encoder and decoder share their text weights; the head is tied to the embedding)."""
    seen: dict[int, torch.nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    return list(seen.values())


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in unique_parameters(model))


def param_bytes(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """What model.safetensors will weigh (tied weights are stored once; buffers are not stored)."""
    return param_count(model) * torch.empty((), dtype=dtype).element_size()


def storage_dtype(model: torch.nn.Module, limit: int = CHECKPOINT_LIMIT_BYTES) -> torch.dtype:
    """float32 if the checkpoint fits the limit, else bfloat16."""
    return torch.float32 if param_bytes(model, torch.float32) + SAFETY_BYTES < limit else torch.bfloat16


# ------------------------------------------------------------------------------------- dense MoE experts

DENSE_EXPERTS = "dgserve_dense"


def dense_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """The top-k MoE computed densely: every expert on every token, unselected experts weighted 0.

    Mathematically the same as transformers' eager/grouped experts (which skip the zero-weight experts), but
    without data-dependent shapes or host syncs: two GEMMs, autocast-friendly, compile-friendly. With few small
    experts (the tiny presets) the extra FLOPs cost less than the eager loop's launches and syncs.
    """
    n, hidden = hidden_states.shape
    experts, two_inter, _ = self.gate_up_proj.shape
    inter = two_inter // 2
    gate_up = F.linear(hidden_states, self.gate_up_proj.reshape(experts * two_inter, hidden))
    gate, up = gate_up.view(n, experts, two_inter).split(inter, dim=-1)  # concatenated [gate; up] per expert
    act = self.act_fn(gate) * up  # (n, E, I)
    weights = torch.zeros(n, experts, dtype=top_k_weights.dtype, device=top_k_weights.device)
    weights = weights.scatter_add(1, top_k_index, top_k_weights)  # (n, E)
    act = act * weights.unsqueeze(-1).to(act.dtype)
    # down_proj is (E, H, I): sum_e down[e] @ act[e]  ==  act(n, E*I) @ down(E*I, H)
    down = self.down_proj.permute(0, 2, 1).reshape(experts * inter, hidden)
    out = act.reshape(n, experts * inter) @ down.to(act.dtype) if act.dtype == down.dtype else \
        F.linear(act.reshape(n, experts * inter), down.t())
    return out.to(hidden_states.dtype)


def _register_dense_experts() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if DENSE_EXPERTS not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(DENSE_EXPERTS, dense_experts_forward)


def use_dense_experts(model: DiffusionGemmaForBlockDiffusion) -> None:
    """Route every MoE block of `model` through `dense_experts_forward` (not saved in the config)."""
    _register_dense_experts()
    model.set_experts_implementation(DENSE_EXPERTS)


# ------------------------------------------------------------------------------------- fused RMSNorm

def _fused_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """DiffusionGemmaRMSNorm.forward as one `F.rms_norm` call (a fused kernel on CUDA): same math, in float32,
    x * (mean(x^2) + eps)^-0.5 * weight, cast back to the input dtype."""
    weight = self.weight.float() if self.with_scale else None
    return F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), weight, self.eps).type_as(hidden_states)


def use_fused_rms_norm(model: torch.nn.Module) -> int:
    """Patch the RMSNorm instances of `model` (not the class: other models in the process are untouched).
    The eager norm is ~7 kernels forward and ~10 backward; the training step is launch-bound on a GPU."""
    n = 0
    for module in model.modules():
        if type(module).__name__ == "DiffusionGemmaRMSNorm":
            module.forward = MethodType(_fused_rms_norm_forward, module)
            n += 1
    return n


# --------------------------------------------------------------------------------------- forward pieces

def new_cache(model: DiffusionGemmaForBlockDiffusion) -> DynamicCache:
    return DynamicCache(config=model.config.get_text_config(decoder=True))


def encode(model: DiffusionGemmaForBlockDiffusion, prompt: torch.Tensor) -> DynamicCache:
    """Encoder pass over `prompt` (B, P), unpadded: returns the KV cache the decoder reads.

    Under autograd the cached keys/values keep their graph, so the decoder loss trains the encoder through them
    (the encoder's own output states feed nothing else). Positions are 0..P-1, as the engine encodes a prompt.
    """
    cache = new_cache(model)
    positions = torch.arange(prompt.shape[1], device=prompt.device)[None]
    model.model.encoder(input_ids=prompt, cache=cache, position_ids=positions)
    return cache


class CacheRows:
    """Read-only view of the first `n` rows of a cache, which is all the decoder reads of it."""

    is_compileable = False

    def __init__(self, cache: DynamicCache, n: int):
        self.layers = [SimpleNamespace(keys=layer.keys[:n], values=layer.values[:n]) for layer in cache.layers]


def decoder_positions(prompt_len: int, canvas_len: int, device) -> torch.Tensor:
    return torch.arange(prompt_len, prompt_len + canvas_len, device=device)[None]


def decode(
    model: DiffusionGemmaForBlockDiffusion,
    canvas: torch.Tensor,
    cache,
    prompt_len: int,
    sc_logits: torch.Tensor | None = None,
    sc_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decoder pass over `canvas` (B, L) reading `cache`; returns soft-capped float32 logits (B, L, V)."""
    out = model(
        cache=cache,
        decoder_input_ids=canvas,
        self_conditioning_logits=sc_logits,
        self_conditioning_mask=sc_mask,
        decoder_position_ids=decoder_positions(prompt_len, canvas.shape[1], canvas.device),
    )
    return out.logits


# ----------------------------------------------------------------------------------------- the objective

def sample_t(batch: int, generator: torch.Generator, device, t_min: float = 0.0) -> torch.Tensor:
    """Noise levels t ~ U(t_min, 1] per example (1 - U[0,1) is never 0)."""
    u = torch.rand(batch, generator=generator, device=device)
    return 1.0 - u * (1.0 - t_min)


def corrupt(
    clean: torch.Tensor,
    t: torch.Tensor,
    vocab_size: int,
    generator: torch.Generator,
    fixed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform-noise corruption: each position is replaced, with probability t (per example), by a token drawn
    uniformly from the whole vocabulary, as the sampler renoises. `fixed` positions (clamped template cells,
    e.g. sudoku givens) are never noised. Returns (noisy canvas, mask of the positions that were redrawn)."""
    u = torch.rand(clean.shape, generator=generator, device=clean.device)
    noised = u < t[:, None]
    if fixed is not None:
        noised &= ~fixed
    noise = torch.randint(0, vocab_size, clean.shape, generator=generator, device=clean.device)
    return torch.where(noised, noise, clean), noised


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, with graph
    noised_loss: torch.Tensor  # scalar, no graph: mean loss over the redrawn positions
    noised_acc: torch.Tensor  # scalar: argmax accuracy over the redrawn positions
    noised: torch.Tensor  # (B, L) bool


def diffusion_loss(
    model: DiffusionGemmaForBlockDiffusion,
    prompt: torch.Tensor,
    clean: torch.Tensor,
    generator: torch.Generator,
    *,
    fixed: torch.Tensor | None = None,
    sc_prob: float = 0.5,
    sc_temperature: tuple[float, float] = (0.4, 0.8),
    t_min: float = 0.0,
    loss_weight: torch.Tensor | None = None,
) -> StepOutput:
    """One step of the objective: encode `prompt`, corrupt `clean` (B, L), predict it at every position.

    Self-conditioning: the first round(sc_prob * B) examples (the batch is i.i.d., so that is a random subset)
    first get a no-grad decoder pass without self-conditioning; its logits, divided by a temperature drawn from
    the sampler's schedule range (inference feeds the temperature-scaled logits of the previous step), become
    their `self_conditioning_logits`. `self_conditioning_mask` zeroes the signal of the others.
    """
    batch, length = clean.shape
    vocab = model.config.get_text_config().vocab_size
    t = sample_t(batch, generator, clean.device, t_min)
    noisy, noised = corrupt(clean, t, vocab, generator, fixed)
    cache = encode(model, prompt)
    prompt_len = prompt.shape[1]

    n_sc = int(round(sc_prob * batch))
    sc_logits = sc_mask = None
    if n_sc > 0:
        with torch.no_grad():
            first = decode(model, noisy[:n_sc], CacheRows(cache, n_sc), prompt_len)
            lo, hi = sc_temperature
            temp = lo + (hi - lo) * torch.rand(n_sc, generator=generator, device=clean.device)
            first = first / temp[:, None, None]
        dtype = model.model.decoder.embed_tokens.weight.dtype
        sc_logits = torch.zeros((batch, length, vocab), dtype=dtype, device=clean.device)
        sc_logits[:n_sc] = first.to(dtype)
        sc_mask = torch.zeros(batch, dtype=torch.bool, device=clean.device)
        sc_mask[:n_sc] = True

    logits = decode(model, noisy, cache, prompt_len, sc_logits, sc_mask)
    per_token = F.cross_entropy(logits.reshape(-1, vocab), clean.reshape(-1), reduction="none").view(batch, length)
    if loss_weight is None:
        loss = per_token.mean()
    else:
        loss = (per_token * loss_weight).sum() / loss_weight.sum().clamp_min(1.0)
    with torch.no_grad():
        n_noised = noised.sum().clamp_min(1)
        noised_loss = (per_token.detach() * noised).sum() / n_noised
        noised_acc = ((logits.detach().argmax(-1) == clean) & noised).sum() / n_noised
    return StepOutput(loss=loss, noised_loss=noised_loss, noised_acc=noised_acc, noised=noised)
