"""DiffusionGemma text layers split so that everything but the KV cache and the attention kernel can be compiled.

A layer is: input norm, q/k/v projections, their norms and RoPE (`project_qkv`), then the part that touches the
KV cache by layer index (encoder: `cache.update`; decoder: concatenation after the cached prompt) and the
attention kernel (sdpa), eager; then the output projection, the attention residual, the dense MLP and the MoE
side by side with their norms, the residual and the layer scalar (`feed_forward_half`). The two halves read no
cache and no layer index, so `torch.compile` makes one graph per layer kind (encoder/decoder, sliding/full, grad
or not) whatever the depth: bounded start-up. transformers' code, op for op (tested against the reference).
Training only: nothing of this is saved.
"""

from __future__ import annotations

from types import MethodType

import torch
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import (
    ALL_ATTENTION_FUNCTIONS,
    apply_rotary_pos_emb,
    eager_attention_forward,
)


def project_qkv(layer: torch.nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, H) -> q (B, heads, T, D), k and v (B, kv_heads, T, D): input norm, projections, q/k/v norms, RoPE."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden_states)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    q = apply_rotary_pos_emb(attn.q_norm(attn.q_proj(x).view(shape)), cos, sin, unsqueeze_dim=2).transpose(1, 2)
    k = attn.k_proj(x).view(shape)
    v = attn.v_proj(x).view(shape) if attn.v_proj is not None else k
    k = apply_rotary_pos_emb(attn.k_norm(k), cos, sin, unsqueeze_dim=2).transpose(1, 2)
    return q, k, attn.v_norm(v).transpose(1, 2)


def feed_forward_half(layer: torch.nn.Module, hidden_states: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """(B, T, H) residual stream + (B, T, heads * D) attention output -> (B, T, H): output projection, attention
    residual, the dense MLP and the MoE side by side, their norms, the residual, the layer scalar."""
    residual = hidden_states + layer.post_attention_layernorm(layer.self_attn.o_proj(attended))
    dense = layer.post_feedforward_layernorm_1(layer.mlp(layer.pre_feedforward_layernorm(residual)))
    flat = residual.reshape(-1, residual.shape[-1])
    _, top_k_weights, top_k_index = layer.router(flat)
    moe = layer.experts(layer.pre_feedforward_layernorm_2(flat), top_k_index, top_k_weights)
    moe = layer.post_feedforward_layernorm_2(moe.reshape(residual.shape))
    return (residual + layer.post_feedforward_layernorm(dense + moe)) * layer.layer_scalar


def _split_layer_forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                         attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                         cache=None, **kwargs) -> torch.Tensor:
    """DiffusionGemma{Encoder,Decoder}TextLayer.forward: `self.dgserve_qkv`, the cache and the attention kernel
    eagerly, `self.dgserve_ffn` (the plain functions above, or their compiled graphs)."""
    attn = self.self_attn
    kwargs = {"position_ids": position_ids, **kwargs}
    q, k, v = self.dgserve_qkv(self, hidden_states, *position_embeddings)
    if cache is not None:
        if hasattr(attn, "append_to_cache"):  # decoder: reads the prompt's cache, never writes it
            k, v = attn.append_to_cache(cache, k, v)
        else:
            k, v = cache.update(k, v, attn.layer_idx, kwargs=kwargs)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    out, _ = interface(attn, q, k, v, attention_mask, dropout=attn.attention_dropout if attn.training else 0.0,
                       scaling=attn.scaling, sliding_window=attn.sliding_window, is_causal=attn.is_causal, **kwargs)
    return self.dgserve_ffn(self, hidden_states, out.reshape(*hidden_states.shape[:-1], -1).contiguous())


def text_layers(model) -> list[torch.nn.Module]:
    return list(model.model.decoder.layers) + list(model.model.encoder.language_model.layers)


def use_split_layers(model, qkv=project_qkv, ffn=feed_forward_half) -> None:
    """Patch the text layers of `model` (instances, not the class) to run `_split_layer_forward`."""
    for layer in text_layers(model):
        layer.forward = MethodType(_split_layer_forward, layer)
        layer.dgserve_qkv, layer.dgserve_ffn = qkv, ffn


_COMPILED: dict[str, object] = {}
RECOMPILE_LIMIT = 64  # layer kinds x grad modes x shapes (training, evaluation, samples): a few dozen at most


def compile_split_layers(model) -> int:
    """Both halves of every layer through `torch.compile` (one compiled function each, shared by all layers and
    models of the process). Returns the number of layers that use them."""
    if not _COMPILED:
        import torch._dynamo

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _COMPILED.update(qkv=torch.compile(project_qkv), ffn=torch.compile(feed_forward_half))
    use_split_layers(model, _COMPILED["qkv"], _COMPILED["ffn"])
    return len(text_layers(model))
