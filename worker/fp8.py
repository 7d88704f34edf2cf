"""Block-scaled float8 weights (DG_QUANTIZATION=fp8): the DeepSeek-V3 recipe, fused into our GEMMs.

Weights of the text layers' projections and experts are float8 e4m3 with one float32 scale per 128 x 128 block,
quantized once at load (`quantize_model`): a 2-D (N, K) weight has scales (ceil(N/128), ceil(K/128)), an expert
stack (E, N, K) has (E, ceil(N/128), ceil(K/128)). Activations are quantized per (token, 128-channel group) inside
the GEMMs, as they load their A tiles (`worker/ops/triton/fp8.py`); per K block of 128 a GEMM adds
dot(a_fp8, w_fp8) * a_scale * w_scale to its float32 accumulator.

Scales are powers of two (the smallest 2^e with amax / 2^e <= 448, e4m3's largest value; DeepSeek's UE8M0 scales):
one binade of e4m3's range at most is given up, and every product with a scale is exact. So a dequantized weight
(fp8 value x scale) is exact in bfloat16 and float32, and the GEMM of fake-quantized activations with dequantized
weights, summed in float32, is the fp8 GEMM's sum of the same exact products in another order. That is how the
plain-torch fp8 ops (`worker/ops/fp8.py`) run on the CPU: dequantize, then the bf16 specs.

In a model, a quantized weight is a float8 Parameter under its own name, with its scales in the buffer
`<name>_fp8_scale` of the same module; `weight_of` gives the pair as an `Fp8Weight`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
import torch.nn.functional as F

BLOCK = 128  # weight blocks are BLOCK x BLOCK; activation groups 1 x BLOCK
E4M3_MAX = 448.0
AMAX_FLOOR = 2.0 ** -64  # an all-zero block gets a finite scale (the kernels use the same floor)
SCALE_SUFFIX = "_fp8_scale"
FP8 = torch.float8_e4m3fn


class Fp8Weight(NamedTuple):
    weight: torch.Tensor  # (..., N, K) float8_e4m3fn
    scale: torch.Tensor  # (..., ceil(N / 128), ceil(K / 128)) float32, powers of two


def pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """The smallest power of two s with amax / s <= 448 (float32)."""
    mantissa, exponent = torch.frexp(amax.float().clamp_min(AMAX_FLOOR))  # amax = mantissa * 2^exponent, [0.5, 1)
    e = exponent - 9 + (mantissa > E4M3_MAX / 512).int()  # 448 = 0.875 * 2^9
    return torch.ldexp(torch.ones_like(amax, dtype=torch.float32), e)


def quantize_blocks(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., R, C) -> float8 values (..., R, C) and float32 scales (..., ceil(R/rows), ceil(C/cols)), one per
    rows x cols block (the edge blocks partial)."""
    *lead, R, C = x.shape
    nr, nc = -(-R // rows), -(-C // cols)
    blocks = F.pad(x.float(), (0, nc * cols - C, 0, nr * rows - R)).view(*lead, nr, rows, nc, cols)
    scale = pow2_scale(blocks.abs().amax(dim=(-3, -1)))  # (..., nr, nc)
    q = (blocks / scale[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)  # exact division, then RNE
    return q.view(*lead, nr * rows, nc * cols)[..., :R, :C].contiguous(), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize_blocks`: q * its block's scale, exact in bfloat16 and float32."""
    R, C = q.shape[-2:]
    s = scale.repeat_interleave(rows, dim=-2)[..., :R, :].repeat_interleave(cols, dim=-1)[..., :C]
    return (q.float() * s).to(dtype)


def quantize(w: torch.Tensor) -> Fp8Weight:
    """A weight (..., N, K) -> its float8 values and 128 x 128 block scales."""
    return Fp8Weight(*quantize_blocks(w, BLOCK, BLOCK))


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_blocks(weight, scale, BLOCK, BLOCK, dtype)


def fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Activations (N, K) as the fp8 GEMMs see them: rounded to e4m3 per (token, 128-channel group), in x's dtype."""
    return dequantize_blocks(*quantize_blocks(x, 1, BLOCK), 1, BLOCK, x.dtype)


# ------------------------------------------------------------------------------------------- weights in a model

# the text layers' weights that DG_QUANTIZATION=fp8 stores as float8 (the attention and dense-MLP projections and
# the experts; the router, norms, embedding / head and self-conditioning block stay in the model dtype)
WEIGHTS = r"(self_attn\.[qkvo]_proj\.weight|mlp\.(gate|up|down)_proj\.weight|experts\.(gate_up_proj|down_proj))"


def weight_of(module: torch.nn.Module, name: str = "weight") -> torch.Tensor | Fp8Weight:
    """The module's weight `name`: an Fp8Weight where `quantize_model` stored it as float8."""
    w = getattr(module, name)
    scale = getattr(module, name + SCALE_SUFFIX, None)
    return w if scale is None else Fp8Weight(w, scale)


def quantize_model(model: torch.nn.Module, prefix: str) -> int:
    """Store the weights named by `WEIGHTS` under `prefix` (a regex; "" for a single layer) as float8 with their
    block scales, in place; returns how many were quantized. A weight shared by several modules (the encoder's and
    the decoder's layers share theirs) is quantized once and every module gets the same pair."""
    pattern = re.compile(f"{prefix}{WEIGHTS}$")
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    matched: set[int] = set()
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, name))
            if pattern.match(f"{module_name}.{name}" if module_name else name):
                matched.add(id(param))
    for key in matched:
        module, name = owners[key][0]
        q, scale = quantize(getattr(module, name).detach())
        param = torch.nn.Parameter(q, requires_grad=False)
        for module, name in owners[key]:
            setattr(module, name, param)
            module.register_buffer(name + SCALE_SUFFIX, scale)
    return len(matched)


# ------------------------------------------------------------------------------- the model runner's GEMM calls


def linear(ops, x: torch.Tensor, w: torch.Tensor | Fp8Weight) -> torch.Tensor:
    """x @ w^T: F.linear for a model-dtype weight, the fp8 GEMM for an Fp8Weight."""
    return ops.linear_fp8(x, *w) if isinstance(w, Fp8Weight) else F.linear(x, w)


def gate_up_gelu(ops, x: torch.Tensor, w_gate: torch.Tensor | Fp8Weight, w_up: torch.Tensor | Fp8Weight
                 ) -> torch.Tensor:
    if isinstance(w_gate, Fp8Weight):
        return ops.gate_up_gelu_fp8(x, *w_gate, *w_up)
    return ops.gate_up_gelu(x, w_gate, w_up)


def moe_gate_up(ops, x: torch.Tensor, w: torch.Tensor | Fp8Weight, *layout_and_top_k) -> torch.Tensor:
    if isinstance(w, Fp8Weight):
        return ops.moe_gate_up_fp8(x, *w, *layout_and_top_k)
    return ops.moe_gate_up(x, w, *layout_and_top_k)


def moe_down(ops, act: torch.Tensor, w: torch.Tensor | Fp8Weight, *layout_and_sizes) -> torch.Tensor:
    if isinstance(w, Fp8Weight):
        return ops.moe_down_fp8(act, *w, *layout_and_sizes)
    return ops.moe_down(act, w, *layout_and_sizes)
