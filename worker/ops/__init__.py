"""The decoder's fused kernels as torch custom ops (`torch.ops.dgserve.*`).

Each op is one kernel: a plain-torch implementation that runs everywhere (the CPU path, and the reference its
Triton twin is tested against), and a Triton implementation registered for CUDA where Triton is installed.
A dispatch-level recorder (`bench/step_cost.py`) sees each as the one kernel it is; `cost.py` says what each
reads, writes and computes.

    norms.py      rms_norm, post_attention, ffn_combine, embed_condition
    mlp.py        gate_up_gelu
    rope.py       qk_norm_rope_store (q/k norms, RoPE, K/V written into the pool in place)
    attention.py  attention over each row's true length in the pool (no dense mask)
    moe.py        moe_route, moe_align, moe_gate_up, moe_down
    fp8.py        linear_fp8, gate_up_gelu_fp8, moe_gate_up_fp8, moe_down_fp8 (block-scaled float8 weights)
"""

from __future__ import annotations

from worker.ops import attention, fp8, mlp, moe, norms, rope  # noqa: F401  (registers the ops)
from worker.ops.triton_kernels import register_cuda_kernels

register_cuda_kernels()
