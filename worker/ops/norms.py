"""Fused RMSNorm ops around the residual stream of a DiffusionGemma layer.

Gemma's RMSNorm (transformers' `DiffusionGemmaRMSNorm`): in float32, x * (mean(x^2) + eps)^-0.5, times the weight
when it has one, rounded back to the input dtype. The plain-torch implementations below do the reference's ops in
the reference's order, so they round where it rounds: on the CPU in float32 they are its numbers exactly.

One layer's residual path, as the reference runs it (h the residual stream, a the attention output, m the dense
MLP output, e the experts' outputs):

    h2 = h + post_attention_norm(a)
    out = (h2 + post_ff_norm(post_ff_norm_1(m) + post_ff_norm_2(sum_k w_k e_k))) * layer_scalar

`post_attention` and `ffn_combine` each do one side of that in one pass, and also emit the normed inputs of what
comes next (the MLP, the experts, the router; the next layer's attention), so the stream is read once per side.
"""

from __future__ import annotations

import torch

from worker.ops.registry import op


def rms(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The reference RMSNorm. (..., H) -> (..., H), x's dtype."""
    xf = x.float()
    normed = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        normed = normed * weight.float()
    return normed.type_as(x)


@op("rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """(N, H) -> (N, H)."""
    return rms(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@op("post_attention", mutates_args=())
def post_attention(h: torch.Tensor, a: torch.Tensor, w_post_attn: torch.Tensor, w_pre_ff: torch.Tensor,
                   w_pre_ff2: torch.Tensor, router_scale: torch.Tensor, eps: float, router_root: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The residual add after attention, and the three normed views of its result.

    h, a (N, H) -> h2 = h + rms(a, w_post_attn); x_mlp = rms(h2, w_pre_ff); x_moe = rms(h2, w_pre_ff2);
    x_router = rms(h2) * router_scale * router_root (the router's own unscaled norm and input scaling).
    """
    h2 = h + rms(a, w_post_attn, eps)
    x_router = rms(h2, None, eps) * router_scale * router_root
    return h2, rms(h2, w_pre_ff, eps), rms(h2, w_pre_ff2, eps), x_router


@post_attention.register_fake
def _(h, a, w_post_attn, w_pre_ff, w_pre_ff2, router_scale, eps, router_root):
    return tuple(torch.empty_like(h) for _ in range(4))


@op("ffn_combine", mutates_args=())
def ffn_combine(h2: torch.Tensor, m: torch.Tensor, e: torch.Tensor, topk_weights: torch.Tensor,
                w_post_ff1: torch.Tensor, w_post_ff2: torch.Tensor, w_post_ff: torch.Tensor,
                layer_scalar: torch.Tensor, w_next: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The end of a layer: the routed sum of the experts, both feed-forward norms, the residual add, the layer
    scalar, and the next norm of the stream (the next layer's input norm, or the decoder's final norm).

    h2, m (N, H); e (N, k, H): each token's k expert outputs in its top-k order (model dtype, unweighted);
    topk_weights (N, k) float32 -> out (N, H) and rms(out, w_next) (N, H).
    The experts' sum is the reference's: float32 products of the rounded outputs and the weights, summed over k
    in float32, rounded to the model dtype.
    """
    experts = (e * topk_weights[..., None]).sum(dim=1).to(h2.dtype)
    s = rms(m, w_post_ff1, eps) + rms(experts, w_post_ff2, eps)
    out = h2 + rms(s, w_post_ff, eps)
    out = (out * layer_scalar).to(h2.dtype)  # the reference scales in place: the stream keeps its dtype
    return out, rms(out, w_next, eps)


@ffn_combine.register_fake
def _(h2, m, e, topk_weights, w_post_ff1, w_post_ff2, w_post_ff, layer_scalar, w_next, eps):
    return torch.empty_like(h2), torch.empty_like(h2)


@op("embed_condition", mutates_args=())
def embed_condition(ids: torch.Tensor, table: torch.Tensor, embed_scale: float, signal: torch.Tensor,
                    w_next: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's input: embed the canvas, add the self-conditioning signal, the unscaled post-norm; and the
    first layer's input norm of the result.

    ids (N,) int64, table (V, H), signal (N, H) -> h = rms(table[ids] * embed_scale + signal), rms(h, w_next).
    """
    embedded = table[ids] * torch.tensor(embed_scale, dtype=table.dtype)
    h = rms(embedded + signal, None, eps)
    return h, rms(h, w_next, eps)


@embed_condition.register_fake
def _(ids, table, embed_scale, signal, w_next, eps):
    return torch.empty_like(signal), torch.empty_like(signal)


@op("embed_norm", mutates_args=())
def embed_norm(ids: torch.Tensor, table: torch.Tensor, embed_scale: float, w_next: torch.Tensor, eps: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's input: embed the tokens, and the first layer's input norm. ids (N,) -> (N, H), (N, H)."""
    h = table[ids] * torch.tensor(embed_scale, dtype=table.dtype)
    return h, rms(h, w_next, eps)


@embed_norm.register_fake
def _(ids, table, embed_scale, w_next, eps):
    shape = (ids.shape[0], table.shape[1])
    return table.new_empty(shape), table.new_empty(shape)
