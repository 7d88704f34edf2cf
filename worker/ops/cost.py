"""What each op's kernel must compute and move: the roofline figures a dispatch-level recorder counts for it.

A recorder (`bench/step_cost.py`) sees one of our ops as one kernel with its real arguments. Counting "every input
read once, every output written once" would be wrong for some of them: the attention kernel reads each row's
true length of the pool, not the pool; the K/V store writes one block per row into the pool; the expert GEMMs read
the weights of the experts that have tokens. So each op names its own figures here, from its arguments:

    cost(args, out) -> (flops, bytes_read, bytes_written)

FLOPs count the useful multiply-adds of GEMM-like work only (2 per MAC: projections, attention, routed expert rows),
as the recorder counts aten matmuls; elementwise work counts bytes only. Expert GEMMs count routed rows, not the
block padding the aligned layout adds (reported separately by `padded_expert_flops`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _all(ts: Sequence[torch.Tensor | None]) -> int:
    return sum(nbytes(t) for t in ts)


def _outs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple | list) else [out]


def _elementwise(tensor_args: Sequence[int]) -> Callable:
    """Read the listed tensor arguments once, write the outputs once."""
    def cost(args, out):
        return 0, _all([args[i] for i in tensor_args]), _all(_outs(out))
    return cost


def _embed(args, out):
    ids, table = args[0], args[1]
    rows = ids.numel() * table.shape[1] * table.element_size()  # the looked-up rows, not the table
    rest = [a for a in args[2:] if isinstance(a, torch.Tensor)]
    return 0, nbytes(ids) + rows + _all(rest), _all(_outs(out))


def _gate_up_gelu(args, out):
    x, wg, wu = args
    return 2 * 2 * x.shape[0] * x.shape[1] * wg.shape[0], _all([x, wg, wu]), nbytes(out)


def _qk_norm_rope_store(args, out):
    q, k, v, qw, kw, positions, inv_freq, _scale, k_pool, v_pool, slots, start, _eps = args
    B, L = positions.shape
    D = qw.shape[0]
    kv_heads = k.shape[1] // D
    fits = (start[:, None] + torch.arange(L, device=start.device)[None, :] < k_pool.shape[2]).sum().item()
    stored = 2 * fits * kv_heads * D * k_pool.element_size()  # keys and values of the block, into the pool
    return 0, _all([q, k, v, qw, kw, positions, inv_freq, slots, start]), nbytes(out) + stored


def _attention(args, out):
    q, k_pool, v_pool, slots, kv_len, q_start, causal, window, _scale = args
    B, L, Hq, D = q.shape
    kv_heads = k_pool.shape[1]
    flops = read = 0
    for n, s in zip(kv_len.tolist(), q_start.tolist(), strict=True):
        read += 2 * n * kv_heads * D * k_pool.element_size()  # each row's keys and values, once
        if causal:
            qpos = torch.arange(s, s + L)
            lo = (qpos - window + 1).clamp(min=0) if window > 0 else torch.zeros_like(qpos)
            pairs = int(((qpos + 1).clamp(max=n) - lo).clamp(min=0).sum())
        else:
            pairs = L * n
        flops += 4 * pairs * Hq * D  # q.k and p.v
    return flops, read + _all([q, slots, kv_len, q_start]), nbytes(out)


def _moe_route(args, out):
    x, w, scale, _k = args
    return 2 * x.shape[0] * x.shape[1] * w.shape[0], _all([x, w, scale]), _all(_outs(out))


def _hit_experts(block_expert: torch.Tensor) -> int:
    return int(torch.unique(block_expert[block_expert >= 0]).numel())


def _pairs(sorted_ids: torch.Tensor, pairs_total: int) -> int:
    return int((sorted_ids < pairs_total).sum())


def _moe_gate_up(args, out):
    x, w, sorted_ids, block_expert, num_padded, top_k = args
    pairs = _pairs(sorted_ids, x.shape[0] * top_k)
    per_expert = w[0].numel() * w.element_size()
    rows = int(num_padded.item())
    read = nbytes(x) + _hit_experts(block_expert) * per_expert + _all([sorted_ids, block_expert, num_padded])
    return 2 * pairs * w.shape[1] * w.shape[2], read, rows * out.shape[1] * out.element_size()


def _moe_down(args, out):
    act, w, sorted_ids, block_expert, num_padded, num_tokens, top_k = args
    pairs = _pairs(sorted_ids, num_tokens * top_k)
    rows = int(num_padded.item())
    per_expert = w[0].numel() * w.element_size()
    read = rows * act.shape[1] * act.element_size() + _hit_experts(block_expert) * per_expert + \
        _all([sorted_ids, block_expert, num_padded])
    return 2 * pairs * w.shape[1] * w.shape[2], read, nbytes(out)


def _linear_fp8(args, out):
    x, w, scale = args  # float8 weights: 1 byte each, plus their block scales
    return 2 * x.shape[0] * x.shape[1] * w.shape[0], _all([x, w, scale]), nbytes(out)


def _gate_up_gelu_fp8(args, out):
    x, wg, sg, wu, su = args
    flops, _, written = _gate_up_gelu((x, wg, wu), out)
    return flops, _all([x, wg, sg, wu, su]), written


def _with_expert_scales(cost: Callable) -> Callable:
    """An expert GEMM over float8 weights (args: activations, weights, scales, the layout...): the model-dtype op's
    figures (the weights at 1 byte) plus the scales of the experts it reads."""
    def fp8_cost(args, out):
        scale, block_expert = args[2], args[4]
        flops, read, written = cost((args[0], args[1], *args[3:]), out)
        return flops, read + _hit_experts(block_expert) * nbytes(scale[0]), written
    return fp8_cost


COSTS: dict[str, Callable] = {
    "rms_norm": _elementwise([0, 1]),
    "post_attention": _elementwise([0, 1, 2, 3, 4, 5]),
    "ffn_combine": _elementwise([0, 1, 2, 3, 4, 5, 6, 7, 8]),
    "embed_condition": _embed,
    "embed_norm": _embed,
    "gate_up_gelu": _gate_up_gelu,
    "qk_norm_rope_store": _qk_norm_rope_store,
    "attention": _attention,
    "moe_route": _moe_route,
    "moe_align": _elementwise([0]),
    "moe_gate_up": _moe_gate_up,
    "moe_down": _moe_down,
    "linear_fp8": _linear_fp8,
    "gate_up_gelu_fp8": _gate_up_gelu_fp8,
    "moe_gate_up_fp8": _with_expert_scales(_moe_gate_up),
    "moe_down_fp8": _with_expert_scales(_moe_down),
}


def padded_expert_flops(args, out) -> int:
    """FLOPs an expert GEMM executes including its blocks' padding rows (moe_gate_up / moe_down arguments)."""
    w, num_padded = args[1], args[4]
    return 2 * int(num_padded.item()) * w.shape[1] * w.shape[2]
