"""Triton kernels of the RMSNorm ops (`worker/ops/norms.py` is their specification).

One program per token row, the whole hidden row in registers (H=2816 -> BLOCK 4096), float32 math. Every
rounding the plain-torch body does to the model dtype (each `rms` result, each add of two rounded tensors, each
product with a model-dtype parameter) is done here at the same point, with bit arithmetic for bfloat16 (the CPU
interpreter's own bf16 conversion truncates), so bf16 results agree to the last bit except where a float32
reduction order differs. Each input row is read once and each output row written once.

`inv_rms_of` serves the RoPE kernel too; the dtype helpers are in `common.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.ops.triton.common import dtype_mode, round_to, rows


def row_block(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a program holding one row of n values: 8-16 values per thread, so a 2816-wide
    row (BLOCK 4096) is 8 warps and the loads stay 16-byte vectors."""
    block = triton.next_power_of_2(n)
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16


@triton.jit
def inv_rms_of(sum_sq, n, eps):
    """(sum_sq / n + eps)^-0.5 with IEEE division and sqrt, as torch computes the mean (a sum, then a division) and
    pow(-0.5) (1 / sqrt) on the CPU; `/` would be the approximate div.full.f32 on a GPU. div_rn takes two tensors
    of one shape."""
    zero = tl.zeros_like(sum_sq)
    return tl.div_rn(zero + 1.0, tl.sqrt_rn(tl.div_rn(sum_sq, zero + n) + eps))


@triton.jit
def inv_rms(x, n, eps, AXIS: tl.constexpr):
    """(mean(x^2) + eps)^-0.5 along AXIS (kept as a size-1 dim) over n values; x float32, zero where masked."""
    return inv_rms_of(tl.sum(x * x, axis=AXIS, keep_dims=True), n, eps)


@triton.jit
def _load_row(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _rms_kernel(x_ptr, w_ptr, out_ptr, H, s_x, eps, HAS_W: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = _load_row(x_ptr + row * s_x, offs, mask)
    y = x * inv_rms(x, H, eps, 0)
    if HAS_W:
        y = y * _load_row(w_ptr, offs, mask)
    tl.store(out_ptr + row * H + offs, round_to(y, MODE).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _post_attention_kernel(h_ptr, a_ptr, w_attn_ptr, w_ff_ptr, w_ff2_ptr, scale_ptr,
                           h2_ptr, mlp_ptr, moe_ptr, router_ptr,
                           H, s_h, s_a, eps, router_root, MODE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    a = _load_row(a_ptr + row * s_a, offs, mask)
    a_normed = round_to(a * inv_rms(a, H, eps, 0) * _load_row(w_attn_ptr, offs, mask), MODE)
    h2 = round_to(_load_row(h_ptr + row * s_h, offs, mask) + a_normed, MODE)
    x = h2 * inv_rms(h2, H, eps, 0)  # float32, before each weight
    mlp = round_to(x * _load_row(w_ff_ptr, offs, mask), MODE)
    moe = round_to(x * _load_row(w_ff2_ptr, offs, mask), MODE)
    router = round_to(round_to(x, MODE) * _load_row(scale_ptr, offs, mask), MODE)
    router = round_to(router * router_root, MODE)
    out = row * H + offs
    dtype = h2_ptr.dtype.element_ty
    tl.store(h2_ptr + out, h2.to(dtype), mask=mask)
    tl.store(mlp_ptr + out, mlp.to(dtype), mask=mask)
    tl.store(moe_ptr + out, moe.to(dtype), mask=mask)
    tl.store(router_ptr + out, router.to(dtype), mask=mask)


@triton.jit
def _ffn_combine_kernel(h2_ptr, m_ptr, e_ptr, tw_ptr, w_ff1_ptr, w_ff2_ptr, w_ff_ptr, ls_ptr, w_next_ptr,
                        out_ptr, x_ptr, H, s_h2, s_m, s_e0, s_e1, s_tw0, s_tw1, eps,
                        K: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    # the routed sum: float32 products of the rounded expert outputs and the weights, summed in top-k order
    # (unrolled: the k loads are in flight together)
    acc = tl.zeros((BLOCK,), tl.float32)
    for j in tl.static_range(K):
        w = tl.load(tw_ptr + row * s_tw0 + j * s_tw1).to(tl.float32)
        acc += _load_row(e_ptr + row * s_e0 + j * s_e1, offs, mask) * w
    experts = round_to(acc, MODE)
    m = _load_row(m_ptr + row * s_m, offs, mask)
    m_normed = round_to(m * inv_rms(m, H, eps, 0) * _load_row(w_ff1_ptr, offs, mask), MODE)
    e_normed = round_to(experts * inv_rms(experts, H, eps, 0) * _load_row(w_ff2_ptr, offs, mask), MODE)
    s = round_to(m_normed + e_normed, MODE)
    s_normed = round_to(s * inv_rms(s, H, eps, 0) * _load_row(w_ff_ptr, offs, mask), MODE)
    out = round_to(_load_row(h2_ptr + row * s_h2, offs, mask) + s_normed, MODE)
    out = round_to(out * tl.load(ls_ptr).to(tl.float32), MODE)
    x = round_to(out * inv_rms(out, H, eps, 0) * _load_row(w_next_ptr, offs, mask), MODE)
    dst = row * H + offs
    tl.store(out_ptr + dst, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(x_ptr + dst, x.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _embed_kernel(ids_ptr, table_ptr, signal_ptr, w_next_ptr, h_ptr, x_ptr, H, s_t, s_sig, embed_scale, eps,
                  HAS_SIGNAL: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    token = tl.load(ids_ptr + row).to(tl.int64)
    h = round_to(_load_row(table_ptr + token * s_t, offs, mask) * embed_scale, MODE)
    if HAS_SIGNAL:
        z = round_to(h + _load_row(signal_ptr + row * s_sig, offs, mask), MODE)
        h = round_to(z * inv_rms(z, H, eps, 0), MODE)
    x = round_to(h * inv_rms(h, H, eps, 0) * _load_row(w_next_ptr, offs, mask), MODE)
    dst = row * H + offs
    tl.store(h_ptr + dst, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(x_ptr + dst, x.to(x_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """(N, H) -> (N, H)."""
    x = rows(x)
    N, H = x.shape
    out = torch.empty((N, H), dtype=x.dtype, device=x.device)
    if N:
        block, warps = row_block(H)
        _rms_kernel[(N,)](x, x if weight is None else weight, out, H, x.stride(0), eps, HAS_W=weight is not None,
                          MODE=dtype_mode(x.dtype), BLOCK=block, num_warps=warps)
    return out


def post_attention(h: torch.Tensor, a: torch.Tensor, w_post_attn: torch.Tensor, w_pre_ff: torch.Tensor,
                   w_pre_ff2: torch.Tensor, router_scale: torch.Tensor, eps: float, router_root: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """h, a (N, H) -> h2, x_mlp, x_moe, x_router (N, H) each, in one pass."""
    h, a = rows(h), rows(a)
    N, H = h.shape
    h2, mlp, moe, router = (torch.empty((N, H), dtype=h.dtype, device=h.device) for _ in range(4))
    if N:
        block, warps = row_block(H)
        _post_attention_kernel[(N,)](h, a, w_post_attn, w_pre_ff, w_pre_ff2, router_scale, h2, mlp, moe, router,
                                     H, h.stride(0), a.stride(0), eps, router_root, MODE=dtype_mode(h.dtype),
                                     BLOCK=block, num_warps=warps)
    return h2, mlp, moe, router


def ffn_combine(h2: torch.Tensor, m: torch.Tensor, e: torch.Tensor, topk_weights: torch.Tensor,
                w_post_ff1: torch.Tensor, w_post_ff2: torch.Tensor, w_post_ff: torch.Tensor,
                layer_scalar: torch.Tensor, w_next: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h2, m (N, H); e (N, k, H); topk_weights (N, k) -> out, rms(out, w_next) (N, H), in one pass."""
    h2, m, e = rows(h2), rows(m), rows(e)
    N, H = h2.shape
    out, x = (torch.empty((N, H), dtype=h2.dtype, device=h2.device) for _ in range(2))
    if N:
        block, warps = row_block(H)
        _ffn_combine_kernel[(N,)](h2, m, e, topk_weights, w_post_ff1, w_post_ff2, w_post_ff, layer_scalar, w_next,
                                  out, x, H, h2.stride(0), m.stride(0), e.stride(0), e.stride(1),
                                  topk_weights.stride(0), topk_weights.stride(1), eps, K=e.shape[1],
                                  MODE=dtype_mode(h2.dtype), BLOCK=block, num_warps=warps)
    return out, x


def _embed(ids: torch.Tensor, table: torch.Tensor, embed_scale: float, signal: torch.Tensor | None,
           w_next: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    table = rows(table)
    N, H = ids.shape[0], table.shape[1]
    dtype = table.dtype if signal is None else signal.dtype
    h, x = (torch.empty((N, H), dtype=dtype, device=table.device) for _ in range(2))
    if N:
        block, warps = row_block(H)
        scale = float(torch.tensor(embed_scale, dtype=table.dtype))  # the reference rounds it to the table's dtype
        signal = None if signal is None else rows(signal)
        _embed_kernel[(N,)](ids, table, table if signal is None else signal, w_next, h, x, H, table.stride(0),
                            0 if signal is None else signal.stride(0), scale, eps, HAS_SIGNAL=signal is not None,
                            MODE=dtype_mode(dtype), BLOCK=block, num_warps=warps)
    return h, x


def embed_condition(ids: torch.Tensor, table: torch.Tensor, embed_scale: float, signal: torch.Tensor,
                    w_next: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (N,), table (V, H), signal (N, H) -> h = rms(table[ids] * scale + signal), rms(h, w_next)."""
    return _embed(ids, table, embed_scale, signal, w_next, eps)


def embed_norm(ids: torch.Tensor, table: torch.Tensor, embed_scale: float, w_next: torch.Tensor, eps: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (N,) -> table[ids] * scale, and its norm (N, H) each."""
    return _embed(ids, table, embed_scale, None, w_next, eps)
