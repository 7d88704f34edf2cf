"""The gated feed-forward's first half as one kernel: both projections and GELU(gate) * up.

Used by the dense MLP of every layer and by the decoder's self-conditioning block; the down projection stays a
plain GEMM. The activation is the checkpoint's `gelu_pytorch_tanh`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.ops.registry import op


@op("gate_up_gelu", mutates_args=())
def gate_up_gelu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """x (N, H), w_gate and w_up (I, H) -> gelu_tanh(x @ w_gate^T) * (x @ w_up^T), (N, I) in x's dtype."""
    return F.gelu(F.linear(x, w_gate), approximate="tanh") * F.linear(x, w_up)


@gate_up_gelu.register_fake
def _(x, w_gate, w_up):
    return x.new_empty((x.shape[0], w_gate.shape[0]))
