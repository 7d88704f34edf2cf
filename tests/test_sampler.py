"""The sampler's pure functions against transformers' reference implementation, on identical inputs."""

from __future__ import annotations

import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from worker import sampler


def peaked_logits(generator: torch.Generator, batch: int, length: int, vocab: int) -> torch.Tensor:
    """Logits whose positions range from nearly certain to flat, so acceptance has real choices."""
    logits = torch.randn((batch, length, vocab), generator=generator)
    sharpness = torch.rand((batch, length, 1), generator=generator) * 40
    winner = torch.randint(0, vocab, (batch, length, 1), generator=generator)
    return logits.scatter_add(-1, winner, sharpness.expand(-1, -1, 1))


def test_temperature_schedule_matches_reference():
    for n in (1, 2, 7, 48):
        proc = LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=n)
        ones = torch.ones(1, 1)
        ref = [1.0 / proc(None, ones, cur_step=s).item() for s in reversed(range(1, n + 1))]
        ours = sampler.temperature(torch.arange(n), torch.full((n,), n), torch.full((n,), 0.4),
                                   torch.full((n,), 0.8))
        assert torch.allclose(ours, torch.tensor(ref), atol=1e-6), (n, ours, ref)


def test_acceptance_decisions_match_reference_on_identical_logits():
    g = torch.Generator().manual_seed(0)
    total_accepted = 0
    for trial in range(20):
        batch, length, vocab = 3, 64, 97
        bound = [0.05, 0.1, 0.5, 2.0][trial % 4]
        logits = peaked_logits(g, batch, length, vocab) / 0.6
        current = torch.randint(0, vocab, (batch, length), generator=g)
        denoised = torch.randint(0, vocab, (batch, length), generator=g)

        ref = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), length, vocab, 10)
        ref_canvas = ref.accept_canvas(current, denoised, logits, cur_step=5)

        entropy = sampler.token_entropy_(logits.clone(), torch.softmax(logits, -1))
        mask = sampler.entropy_bound_accept(entropy, torch.full((batch,), bound))
        assert torch.equal(mask, ref.accepted_token_mask)
        assert torch.equal(torch.where(mask, denoised, current), ref_canvas)
        total_accepted += int(mask.sum())
    assert total_accepted > 20 * 3 * 2  # more than one position per row on average: a real test


def test_entropy_matches_torch_categorical():
    g = torch.Generator().manual_seed(1)
    logits = peaked_logits(g, 2, 16, 1000)
    ref = torch.distributions.Categorical(logits=logits).entropy()
    ours = sampler.token_entropy_(logits, torch.softmax(logits, -1))
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6)
    small = ref < 0.01  # the entropies that decide acceptance and the stop must be exact too
    assert small.any() and torch.allclose(ours[small], ref[small], rtol=1e-3, atol=1e-9)


def test_stable_and_confident_stop_matches_reference():
    g = torch.Generator().manual_seed(2)
    for threshold in (0, 1, 2, 3):
        ref = StableAndConfidentStoppingCriteria(stability_threshold=threshold, confidence_threshold=1.5)
        run = torch.zeros(2, dtype=torch.long)
        prev = torch.full((2, 8), -1)
        drafts = [torch.randint(0, 3, (2, 8), generator=g) for _ in range(4)]
        drafts += [drafts[-1]] * 4 + [torch.randint(0, 3, (2, 8), generator=g)] + [drafts[-1]] * 3
        for draft in drafts:
            logits = torch.randn((2, 8, 5), generator=g) * 3
            expected = ref(draft, logits)
            entropy = torch.distributions.Categorical(logits=logits).entropy().mean(-1)
            run = sampler.stable_run(draft, prev, run)
            ours = sampler.should_stop(run, entropy, torch.full((2,), threshold), torch.full((2,), 1.5))
            prev = draft
            assert torch.equal(ours, expected), threshold


def test_renoise_keeps_accepted_and_draws_the_rest_from_each_rows_generator():
    accepted = torch.tensor([[True, False, True, False], [False, False, False, True]])
    canvas = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    gens = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    out = sampler.renoise(canvas, accepted, 1000, gens)
    assert torch.equal(out[accepted], canvas[accepted])
    # row 1 alone with the same seed draws the same noise: rows do not share randomness
    alone = sampler.renoise(canvas[1:], accepted[1:], 1000, [torch.Generator().manual_seed(11)])
    assert torch.equal(alone[0], out[1])


def test_template_clamp():
    canvas = torch.tensor([[1, 2, 3]])
    fixed = torch.tensor([[False, True, False]])
    ids = torch.tensor([[0, 9, 0]])
    assert sampler.clamp_template(canvas, fixed, ids).tolist() == [[1, 9, 3]]


def test_inverse_cdf_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).expand(1, 4000, 4).contiguous()
    draws = sampler.sample_rows_inverse_cdf(probs, [torch.Generator().manual_seed(0)])
    freq = torch.bincount(draws[0], minlength=4).float() / 4000
    assert torch.allclose(freq, probs[0, 0], atol=0.03), freq
    # zero-probability tokens are never drawn, even at the edges
    edge = torch.tensor([0.0, 1.0, 0.0]).expand(1, 500, 3).contiguous()
    assert (sampler.sample_rows_inverse_cdf(edge, [torch.Generator().manual_seed(1)]) == 1).all()
