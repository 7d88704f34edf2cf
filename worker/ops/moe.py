"""The mixture of experts in four kernels: route, align, the gate/up GEMM, the down GEMM.

    moe_route    router logits, softmax, top-k, renormalise, per-expert scale       -> weights (N, k), ids (N, k)
    moe_align    the N*k (token, slot) pairs grouped by expert, each group padded to whole blocks of `block`
                 rows, so that every block of the grouped GEMMs belongs to one expert (fixed-size outputs: CUDA
                 graphs capture it)
    moe_gate_up  per block: gather its tokens' rows, x @ W_gate_up[e]^T, GELU(gate) * up    -> (P, I)
    moe_down     per block: act @ W_down[e]^T, written straight to each pair's place in token order -> (N, k, H)

The routed weighting and the top-k sum happen in `ffn_combine` (norms.py), which reads each token's k outputs
once: deterministic (no atomics), and the reference's rounding (float32 products of the rounded expert outputs,
summed in float32).

Layout of the aligned pairs: `sorted_ids[p]` is a flat pair index token * k + slot, or the sentinel N * k in
padding; `block_expert[i]` is the expert of rows i*block .. (i+1)*block - 1, or -1 past `num_padded`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.ops.registry import op


@op("moe_route", mutates_args=())
def moe_route(x: torch.Tensor, weight: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, H) (the router's normed, scaled input), weight (E, H), per_expert_scale (E,)
    -> top-k weights (N, k) float32, expert ids (N, k) int32."""
    probs = torch.softmax(F.linear(x, weight), dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, k=top_k, dim=-1)
    weights /= weights.sum(dim=-1, keepdim=True)
    return weights * per_expert_scale[ids], ids.to(torch.int32)


@moe_route.register_fake
def _(x, weight, per_expert_scale, top_k):
    n = x.shape[0]
    return x.new_empty((n, top_k), dtype=torch.float32), x.new_empty((n, top_k), dtype=torch.int32)


def padded_size(pairs: int, num_experts: int, block: int) -> int:
    """Rows of the aligned layout: enough for any routing of `pairs` pairs over `num_experts` experts."""
    worst = pairs + min(num_experts, pairs) * (block - 1)
    return -(-worst // block) * block


@op("moe_align", mutates_args=())
def moe_align(ids: torch.Tensor, num_experts: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (N, k) int32 -> sorted_ids (P,) int32, block_expert (P / block,) int32, num_padded (1,) int32.

    Pairs are grouped by expert in ascending order, in pair order within an expert (stable: deterministic).
    """
    flat = ids.reshape(-1).long()
    pairs = flat.numel()
    P = padded_size(pairs, num_experts, block)
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    padded = (counts + block - 1) // block * block
    group_start = torch.cumsum(padded, 0) - padded  # (E,) first row of each expert's group
    order = torch.sort(flat, stable=True).indices  # pairs by expert
    sorted_experts = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(pairs, device=ids.device) - first_of_expert[sorted_experts]  # place within its group
    sorted_ids = torch.full((P,), pairs, dtype=torch.int32, device=ids.device)
    sorted_ids[group_start[sorted_experts] + rank] = order.to(torch.int32)
    total = padded.sum()
    block_expert = torch.full((P // block,), -1, dtype=torch.int32, device=ids.device)
    block_expert[: int(total) // block] = torch.repeat_interleave(
        torch.arange(num_experts, device=ids.device, dtype=torch.int32), padded // block)
    return sorted_ids, block_expert, total.reshape(1).to(torch.int32)


@moe_align.register_fake
def _(ids, num_experts, block):
    P = padded_size(ids.numel(), num_experts, block)
    return (ids.new_empty((P,), dtype=torch.int32), ids.new_empty((P // block,), dtype=torch.int32),
            ids.new_empty((1,), dtype=torch.int32))


def expert_rows(sorted_ids: torch.Tensor, block_expert: torch.Tensor, block: int, pairs: int):
    """For the plain-torch GEMMs: (expert, aligned rows, their pair indices) per expert that has pairs."""
    rows_expert = block_expert.repeat_interleave(block)  # (P,)
    real = (sorted_ids < pairs) & (rows_expert >= 0)
    for e in torch.unique(rows_expert[real]).tolist():
        rows = torch.nonzero(real & (rows_expert == e)).squeeze(1)
        yield e, rows, sorted_ids[rows].long()


def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, block_expert: torch.Tensor) -> torch.Tensor | None:
    """rows (P, K) of the aligned layout through their blocks' experts, weight (E, N, K) -> (P, N), in one grouped
    GEMM; None where torch has none for these tensors (tensor subclasses, unaligned strides: the caller loops).
    Rows past the last expert's group are left undefined."""
    aligned = all(d * rows.element_size() % 16 == 0 for d in weight.shape[1:])
    if not (hasattr(torch, "_grouped_mm") and type(weight) in (torch.Tensor, torch.nn.Parameter) and aligned
            and rows.dtype in (torch.float32, torch.bfloat16)):
        return None
    block = rows.shape[0] // block_expert.shape[0]
    counts = torch.bincount(block_expert[block_expert >= 0].long(), minlength=weight.shape[0]) * block
    try:
        return torch._grouped_mm(rows, weight.transpose(-2, -1), offs=torch.cumsum(counts, 0).to(torch.int32))
    except RuntimeError:  # a layout this build of torch refuses
        return None


@op("moe_gate_up", mutates_args=())
def moe_gate_up(x: torch.Tensor, w_gate_up: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor,
                num_padded: torch.Tensor, top_k: int) -> torch.Tensor:
    """x (N, H), w_gate_up (E, 2I, H) -> act (P, I): row p = GELU(gate) * up of its pair's token through its
    block's expert (padding rows: zeros)."""
    N = x.shape[0]
    pairs = N * top_k
    block = sorted_ids.shape[0] // block_expert.shape[0]
    inter = w_gate_up.shape[1] // 2
    real = (sorted_ids < pairs) & (block_expert.repeat_interleave(block) >= 0)
    tokens = sorted_ids.clamp(max=pairs - 1).long() // top_k
    grouped = grouped_linear(x[tokens], w_gate_up, block_expert)
    if grouped is not None:
        gate, up = grouped.chunk(2, dim=-1)
        return torch.where(real[:, None], F.gelu(gate, approximate="tanh") * up, 0.0).to(x.dtype)
    out = x.new_zeros((sorted_ids.shape[0], inter))
    for e, rows, pair in expert_rows(sorted_ids, block_expert, block, pairs):
        gate, up = F.linear(x[pair // top_k], w_gate_up[e]).chunk(2, dim=-1)
        out[rows] = F.gelu(gate, approximate="tanh") * up
    return out


@moe_gate_up.register_fake
def _(x, w_gate_up, sorted_ids, block_expert, num_padded, top_k):
    return x.new_empty((sorted_ids.shape[0], w_gate_up.shape[1] // 2))


@op("moe_down", mutates_args=())
def moe_down(act: torch.Tensor, w_down: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor,
             num_padded: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """act (P, I), w_down (E, H, I) -> (N, k, H): each pair's expert output at [token, slot] (unweighted)."""
    pairs = num_tokens * top_k
    block = sorted_ids.shape[0] // block_expert.shape[0]
    out = act.new_empty((pairs, w_down.shape[1]))
    grouped = grouped_linear(act, w_down, block_expert)
    if grouped is not None:
        real = torch.nonzero((sorted_ids < pairs) & (block_expert.repeat_interleave(block) >= 0)).squeeze(1)
        out[sorted_ids[real].long()] = grouped[real]
        return out.view(num_tokens, top_k, -1)
    for e, rows, pair in expert_rows(sorted_ids, block_expert, block, pairs):
        out[pair] = F.linear(act[rows], w_down[e])
    return out.view(num_tokens, top_k, -1)


@moe_down.register_fake
def _(act, w_down, sorted_ids, block_expert, num_padded, num_tokens, top_k):
    return act.new_empty((num_tokens, top_k, w_down.shape[1]))
