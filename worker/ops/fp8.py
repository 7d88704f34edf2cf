"""The GEMMs over block-scaled float8 weights (DG_QUANTIZATION=fp8; `worker/fp8.py` has the format).

Same layouts and outputs as the model-dtype ops they stand for; each weight comes as its float8 values and its
float32 128 x 128 block scales:

    linear_fp8        F.linear                    x (N, K), weight (Nout, K)            -> (N, Nout)
    gate_up_gelu_fp8  gate_up_gelu (mlp.py)       x (N, H), w_gate and w_up (I, H)      -> (N, I)
    moe_gate_up_fp8   moe_gate_up (moe.py)        x (N, H), w_gate_up (E, 2I, H)        -> (P, I)
    moe_down_fp8      moe_down (moe.py)           act (P, I), w_down (E, H, I)          -> (N, k, H)

What they compute: the activations rounded to e4m3 per (token, 128-channel group) with a power-of-two scale
(`fake_quant`), times the dequantized weights, with the model-dtype op's own roundings; the output in x's dtype.
The plain-torch bodies below do exactly that (dequantize, then the model-dtype spec: both operands are exact in
the model dtype, so they differ from the Triton kernels' fp8 tensor-core sums only in float32 summation order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.fp8 import dequantize, fake_quant
from worker.ops.registry import PLAIN, op


@op("linear_fp8", mutates_args=())
def linear_fp8(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """x (N, K); weight (Nout, K) float8_e4m3fn, weight_scale (ceil(Nout/128), ceil(K/128)) -> (N, Nout)."""
    return F.linear(fake_quant(x), dequantize(weight, weight_scale, x.dtype))


@linear_fp8.register_fake
def _(x, weight, weight_scale):
    return x.new_empty((x.shape[0], weight.shape[0]))


@op("gate_up_gelu_fp8", mutates_args=())
def gate_up_gelu_fp8(x: torch.Tensor, w_gate: torch.Tensor, w_gate_scale: torch.Tensor, w_up: torch.Tensor,
                     w_up_scale: torch.Tensor) -> torch.Tensor:
    """x (N, H); w_gate, w_up (I, H) float8 with their block scales -> gelu_tanh(x w_gate^T) * (x w_up^T) (N, I)."""
    return PLAIN["gate_up_gelu"](fake_quant(x), dequantize(w_gate, w_gate_scale, x.dtype),
                                 dequantize(w_up, w_up_scale, x.dtype))


@gate_up_gelu_fp8.register_fake
def _(x, w_gate, w_gate_scale, w_up, w_up_scale):
    return x.new_empty((x.shape[0], w_gate.shape[0]))


@op("moe_gate_up_fp8", mutates_args=())
def moe_gate_up_fp8(x: torch.Tensor, w_gate_up: torch.Tensor, w_gate_up_scale: torch.Tensor,
                    sorted_ids: torch.Tensor, block_expert: torch.Tensor, num_padded: torch.Tensor, top_k: int
                    ) -> torch.Tensor:
    """x (N, H); w_gate_up (E, 2I, H) float8, w_gate_up_scale (E, ceil(2I/128), ceil(H/128)) -> act (P, I)."""
    w = dequantize(w_gate_up, w_gate_up_scale, x.dtype)
    return PLAIN["moe_gate_up"](fake_quant(x), w, sorted_ids, block_expert, num_padded, top_k)


@moe_gate_up_fp8.register_fake
def _(x, w_gate_up, w_gate_up_scale, sorted_ids, block_expert, num_padded, top_k):
    return x.new_empty((sorted_ids.shape[0], w_gate_up.shape[1] // 2))


@op("moe_down_fp8", mutates_args=())
def moe_down_fp8(act: torch.Tensor, w_down: torch.Tensor, w_down_scale: torch.Tensor, sorted_ids: torch.Tensor,
                 block_expert: torch.Tensor, num_padded: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """act (P, I); w_down (E, H, I) float8, w_down_scale (E, ceil(H/128), ceil(I/128)) -> (N, k, H)."""
    w = dequantize(w_down, w_down_scale, act.dtype)
    return PLAIN["moe_down"](fake_quant(act), w, sorted_ids, block_expert, num_padded, num_tokens, top_k)


@moe_down_fp8.register_fake
def _(act, w_down, w_down_scale, sorted_ids, block_expert, num_padded, num_tokens, top_k):
    return act.new_empty((num_tokens, top_k, w_down.shape[1]))
