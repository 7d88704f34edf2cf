"""The DiffusionGemma sampler as pure tensor functions.

Semantics are those of transformers' `generation_diffusion_gemma.py` (the reference): a linear
temperature schedule, multinomial sampling of every position, entropy-bound acceptance, uniform
renoising of the rest, and the stable-and-confident adaptive stop. Everything is batched over rows
with per-row parameters, so rows at different steps, with different settings, share one call.

No I/O, no `.item()`, no tokenizer: token ids and parameters come in as tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def temperature(steps_done: torch.Tensor, num_steps: torch.Tensor, t_min: torch.Tensor, t_max: torch.Tensor):
    """Per-row temperature of the reference schedule.

    The reference counts `cur_step` down from N to 1, so the k-th step (0-based) runs at
    t_min + (t_max - t_min) * (N - k) / N: t_max first, never quite t_min.
    """  # all (B,)
    remaining = (num_steps - steps_done).to(t_min.dtype)
    return t_min + (t_max - t_min) * (remaining / num_steps.to(t_min.dtype))


def token_entropy_(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) given its `probs`; turns `logits` into log-probabilities IN PLACE.

    H = -sum_v p_v (x_v - logsumexp(x)). Subtracting per element (rather than logsumexp(x) - p.x)
    keeps small entropies exact: they decide acceptance (bound 0.1) and the stop (mean < 0.005).
    (..., V) -> (...)
    """
    logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
    return -torch.linalg.vecdot(probs, logits)


def entropy_bound_accept(entropy: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Accept the k lowest-entropy positions with sum(H_1..k) - max(H_1..k) <= bound.

    entropy (B, L), bound (B,) -> accepted mask (B, L). At least one position is always accepted.
    """
    sorted_entropy, order = torch.sort(entropy, dim=-1)
    cumulative = torch.cumsum(sorted_entropy, dim=-1)
    selected = (cumulative - sorted_entropy) <= bound[:, None]
    return torch.zeros_like(selected).scatter(-1, order, selected)


def sample_rows(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One multinomial draw per position, each row from its own generator. probs (B, L, V) -> (B, L)."""
    rows = [
        torch.multinomial(probs[i], num_samples=1, generator=g).squeeze(-1)
        for i, g in enumerate(generators)
    ]
    return torch.stack(rows)


def sample_rows_inverse_cdf(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """The same distribution as `sample_rows`, by inverting each position's CDF at one uniform draw.

    Several times faster than torch.multinomial on a CPU; the draws differ from the reference's, so a
    seed gives other (equally distributed) tokens. probs (B, L, V) -> (B, L).
    """
    B, L, V = probs.shape
    u = torch.stack([torch.rand(L, generator=g, device=probs.device) for g in generators])  # (B, L)
    cdf = probs.cumsum(dim=-1)  # (B, L, V)
    picked = torch.searchsorted(cdf, (u * cdf[..., -1])[..., None]).squeeze(-1)
    return picked.clamp_max(V - 1)


def uniform_tokens(
    shape_per_row: tuple[int, ...], vocab_size: int, generators: Sequence[torch.Generator | None], device
) -> torch.Tensor:
    """Uniform random tokens, each row from its own generator. -> (B, *shape_per_row)."""
    rows = [
        torch.randint(0, vocab_size, (1, *shape_per_row), generator=g, device=device)[0] for g in generators
    ]
    return torch.stack(rows)


def clamp_template(canvas: torch.Tensor, fixed: torch.Tensor | None, fixed_ids: torch.Tensor | None):
    """Force template positions (fixed mask True) to their template ids."""
    if fixed is None:
        return canvas
    return torch.where(fixed, fixed_ids, canvas)


def renoise(
    accepted_canvas: torch.Tensor,
    accepted: torch.Tensor,
    vocab_size: int,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Replace every position not accepted by a fresh uniform token (the reference's renoise_canvas)."""
    noise = uniform_tokens(tuple(accepted_canvas.shape[1:]), vocab_size, generators, accepted_canvas.device)
    return torch.where(accepted, accepted_canvas, noise)


def stable_run(draft: torch.Tensor, previous_draft: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """Consecutive previous drafts equal to the current one. (B, L), (B, L), (B,) -> (B,).

    The reference keeps the last `k` drafts and calls a canvas stable when all equal the current one;
    that is exactly `run >= k`.
    """
    same = (draft == previous_draft).all(dim=-1)
    return torch.where(same, run + 1, torch.zeros_like(run))


def should_stop(
    run: torch.Tensor, mean_entropy: torch.Tensor, stability_threshold: torch.Tensor, confidence: torch.Tensor
) -> torch.Tensor:
    """The stable-and-confident adaptive stop. All (B,) -> (B,) bool."""
    return (run >= stability_threshold) & (mean_entropy < confidence)


def decide(
    sampled: torch.Tensor,
    draft: torch.Tensor,
    entropy: torch.Tensor,
    canvas: torch.Tensor,
    previous_draft: torch.Tensor,
    run: torch.Tensor,
    fixed: torch.Tensor | None,
    fixed_ids: torch.Tensor | None,
    bound: torch.Tensor,
    stability_threshold: torch.Tensor,
    confidence: torch.Tensor,
    vocab_size: int,
    generators: Sequence[torch.Generator | None],
) -> dict[str, torch.Tensor]:
    """One denoising step's decisions for every row, from the sampler kernels' outputs.

    Template positions are clamped and count as accepted with zero entropy; the k lowest-entropy positions within
    the bound are kept and the rest renoised; the draft's stability run and the adaptive stop follow.
    (B, L) tensors and (B,) parameters -> canvas, draft, accepted, entropy (B, L); mean_entropy, run, stop (B,).
    """
    draft = clamp_template(draft, fixed, fixed_ids)
    sampled = clamp_template(sampled, fixed, fixed_ids)
    if fixed is not None:
        entropy = entropy.masked_fill(fixed, 0.0)
    accepted = entropy_bound_accept(entropy, bound)
    if fixed is not None:
        accepted |= fixed
    new_canvas = clamp_template(renoise(torch.where(accepted, sampled, canvas), accepted, vocab_size, generators),
                                fixed, fixed_ids)
    free = (~fixed).float() if fixed is not None else torch.ones_like(entropy)
    mean_entropy = (entropy * free).sum(-1) / free.sum(-1).clamp_min(1.0)
    run = stable_run(draft, previous_draft, run)
    stop = should_stop(run, mean_entropy, stability_threshold, confidence)
    return {"canvas": new_canvas, "draft": draft, "accepted": accepted, "entropy": entropy,
            "mean_entropy": mean_entropy, "run": run, "stop": stop}
