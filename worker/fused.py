"""The fused sampler: two passes of one Triton kernel over the raw vocabulary logits.

Pass 1, per canvas position, in ONE read of the (model-dtype) head output: soft-cap, temperature,
online softmax statistics (max, normaliser), the entropy, the argmax (the draft), a Gumbel-max sample
drawn from the request's own seed, and the statistics of the model-dtype rounding that
self-conditioning uses. No float32 vocabulary-sized tensor is ever materialised.
Pass 2 writes the self-conditioning probabilities softmax(round(x)) in the model dtype, for the
(B·L, V) @ (V, H) soft-embedding product.

Math per position, x = head output, c = soft cap, T = temperature:
    y = c * tanh(x / c) / T              (the reference's processed logits)
    H = log Z - (1/Z) sum e^(y-m) (y-m)  (kept exact for small entropies: no cancellation)
    sample = argmax(y + Gumbel(u)),  u ~ U(0,1) from Philox(seed_row, position * V + v)
The PyTorch twin `reference_stats` computes the same from the same u, for the tests.

Runs on CUDA; on a CPU under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    from worker.ops.triton.common import round_bf16

    HAVE_TRITON = True
except ImportError:  # the CPU default path does not need it
    HAVE_TRITON = False


if HAVE_TRITON:

    @triton.jit
    def _transform(x, cap, inv_temp, HAS_CAP: tl.constexpr):
        if HAS_CAP:
            # tanh(z) = 1 - 2 / (exp(2z) + 1), stable at both ends
            z = x / cap
            x = cap * (1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))
        return x * inv_temp

    @triton.jit
    def _stats_kernel(
        logits_ptr, inv_temp_ptr, seed_ptr, noise_ptr,
        argmax_ptr, sample_ptr, entropy_ptr, round_max_ptr, round_sum_ptr,
        V, L, cap,
        HAS_CAP: tl.constexpr, ROUND_BF16: tl.constexpr, USE_NOISE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pos = tl.program_id(0)  # one program per canvas position (row * L + j)
        row = pos // L
        inv_temp = tl.load(inv_temp_ptr + row)
        seed = tl.load(seed_ptr + row)
        base = logits_ptr + pos.to(tl.int64) * V
        m = tl.full((), float("-inf"), tl.float32)
        s0 = tl.zeros((), tl.float32)
        s1 = tl.zeros((), tl.float32)
        best = tl.full((), float("-inf"), tl.float32)
        best_i = tl.zeros((), tl.int64)
        gbest = tl.full((), float("-inf"), tl.float32)
        gbest_i = tl.zeros((), tl.int64)
        rm = tl.full((), float("-inf"), tl.float32)
        rs = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < V
            x = tl.load(base + offs, mask=valid, other=0.0).to(tl.float32)
            y = _transform(x, cap, inv_temp, HAS_CAP)
            y = tl.where(valid, y, float("-inf"))
            # online softmax statistics and entropy
            m_new = tl.maximum(m, tl.max(y, 0))
            scale = tl.exp(m - m_new)
            e = tl.exp(y - m_new)
            d = tl.where(valid, y - m_new, 0.0)
            shift = tl.where(s0 > 0, (m - m_new) * s0, 0.0)  # 0 * -inf on the first block
            s1 = scale * (s1 + shift) + tl.sum(e * d, 0)
            s0 = s0 * scale + tl.sum(e, 0)
            m = m_new
            # argmax: the first index of the maximum, as torch.argmax
            bmax = tl.max(y, 0)
            bidx = tl.argmax(y, 0).to(tl.int64) + start
            take = bmax > best
            best_i = tl.where(take, bidx, best_i)
            best = tl.where(take, bmax, best)
            # Gumbel-max sample
            if USE_NOISE:
                u = tl.load(noise_ptr + pos.to(tl.int64) * V + offs, mask=valid, other=0.5)
            else:
                u = tl.rand(seed, (pos % L) * V + offs)
            u = tl.minimum(tl.maximum(u, 1e-20), 1.0 - 1e-7)
            g = tl.where(valid, y - tl.log(-tl.log(u)), float("-inf"))
            gmax = tl.max(g, 0)
            gidx = tl.argmax(g, 0).to(tl.int64) + start
            gtake = gmax > gbest
            gbest_i = tl.where(gtake, gidx, gbest_i)
            gbest = tl.where(gtake, gmax, gbest)
            # statistics of the rounded values that self-conditioning takes the softmax of
            if ROUND_BF16:
                yr = round_bf16(y)
            else:
                yr = y
            rm_new = tl.maximum(rm, tl.max(yr, 0))
            rs = rs * tl.exp(rm - rm_new) + tl.sum(tl.where(valid, tl.exp(yr - rm_new), 0.0), 0)
            rm = rm_new
        tl.store(argmax_ptr + pos, best_i)
        tl.store(sample_ptr + pos, gbest_i)
        tl.store(entropy_ptr + pos, tl.log(s0) - s1 / s0)
        tl.store(round_max_ptr + pos, rm)
        tl.store(round_sum_ptr + pos, rs)

    @triton.jit
    def _probs_kernel(
        logits_ptr, inv_temp_ptr, round_max_ptr, round_sum_ptr, out_ptr, V, L, cap,
        HAS_CAP: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr,
    ):
        pos = tl.program_id(0)
        row = pos // L
        inv_temp = tl.load(inv_temp_ptr + row)
        rm = tl.load(round_max_ptr + pos)
        inv_rs = 1.0 / tl.load(round_sum_ptr + pos)
        base = pos.to(tl.int64) * V
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < V
            x = tl.load(logits_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
            y = _transform(x, cap, inv_temp, HAS_CAP)
            if ROUND_BF16:
                y = round_bf16(y)
            p = tl.exp(y - rm) * inv_rs
            if ROUND_BF16:
                p = round_bf16(p)  # exact in bf16 now: the store's own conversion cannot change it
            tl.store(out_ptr + base + offs, p.to(out_ptr.dtype.element_ty), mask=valid)


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def _flags(logits: torch.Tensor, model_dtype: torch.dtype, cap: float | None) -> dict:
    if model_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"the fused sampler supports {SUPPORTED_DTYPES}, not {model_dtype}")
    return dict(HAS_CAP=cap is not None, ROUND_BF16=model_dtype == torch.bfloat16)


def fused_stats(
    logits: torch.Tensor, inv_temp: torch.Tensor, seeds: torch.Tensor, cap: float | None, model_dtype: torch.dtype,
    noise: torch.Tensor | None = None, block: int = 2048,
) -> dict[str, torch.Tensor]:
    """Pass 1. logits (B, L, V) any float dtype (contiguous); inv_temp (B,) f32; seeds (B,) int64.

    Returns argmax (B, L), sample (B, L), entropy (B, L) f32, and the rounded-softmax statistics.
    """
    B, L, V = logits.shape
    P = B * L
    dev = logits.device
    out = {
        "argmax": torch.empty((B, L), dtype=torch.long, device=dev),
        "sample": torch.empty((B, L), dtype=torch.long, device=dev),
        "entropy": torch.empty((B, L), dtype=torch.float32, device=dev),
        "round_max": torch.empty((B, L), dtype=torch.float32, device=dev),
        "round_sum": torch.empty((B, L), dtype=torch.float32, device=dev),
    }
    _stats_kernel[(P,)](
        logits, inv_temp, seeds, noise if noise is not None else logits,
        out["argmax"], out["sample"], out["entropy"], out["round_max"], out["round_sum"],
        V, L, float(cap or 1.0), USE_NOISE=noise is not None, BLOCK=block, **_flags(logits, model_dtype, cap),
    )
    return out


def fused_probs(
    logits: torch.Tensor, inv_temp: torch.Tensor, stats: dict[str, torch.Tensor], cap: float | None,
    model_dtype: torch.dtype, block: int = 2048,
) -> torch.Tensor:
    """Pass 2: self-conditioning probabilities softmax(round(y)) in the model dtype. -> (B, L, V)."""
    B, L, V = logits.shape
    out = torch.empty((B, L, V), dtype=model_dtype, device=logits.device)
    _probs_kernel[(B * L,)](
        logits, inv_temp, stats["round_max"], stats["round_sum"], out, V, L, float(cap or 1.0),
        BLOCK=block, **{k: v for k, v in _flags(logits, model_dtype, cap).items()},
    )
    return out


def reference_stats(logits: torch.Tensor, inv_temp: torch.Tensor, cap: float | None, model_dtype: torch.dtype,
                    noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same quantities with plain PyTorch ops, as the reference sampler computes them (tests)."""
    y = logits.float()
    if cap is not None:
        y = torch.tanh(y / cap) * cap
    y = y * inv_temp[:, None, None]
    entropy = torch.distributions.Categorical(logits=y).entropy()
    g = -torch.log(-torch.log(noise.clamp(1e-20, 1 - 1e-7)))
    rounded = y.to(model_dtype)
    return {
        "argmax": y.argmax(-1),
        "sample": (y + g).argmax(-1),
        "entropy": entropy,
        "probs": torch.softmax(rounded, dim=-1, dtype=torch.float32).to(model_dtype),
    }
