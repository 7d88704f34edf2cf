"""Weight-only quantization: int4 and int8 through torchao (the 24 GB mode), fp8 our own; experts included.

transformers' torchao integration quantizes `nn.Linear` weights by default. In DiffusionGemma almost every
weight is elsewhere: the mixture of experts keeps each layer's experts as two 3-D parameters
(`experts.gate_up_proj`, `experts.down_proj`), about 22 of the 26B parameters. So the configuration here names
those parameters explicitly (torchao's `FqnToConfig` quantizes parameters as well as modules) together with the
attention and dense-MLP projections of every text layer. The embedding (tied to the output head) and the tiny
vision tower stay in the model dtype.

A quantized 3-D expert tensor supports selecting one expert and `F.linear` on it, not `grouped_mm`, so quantized
models run transformers' "eager" experts (a loop over the experts hit). That loop reads which experts were hit
on the host, which CUDA graphs cannot capture: the engine decodes eagerly for quantized models.

Kinds:
* `int4`: 4-bit weights, groups of 128 along the input dimension, PyTorch's tinygemm kernel (CUDA only). The
  26B-A4B weights take ~14 GB: the 24 GB-card mode.
* `int8`: 8-bit weights, one scale per output channel (CPU and CUDA). ~27 GB for the 26B-A4B.
* `fp8`: ours (`worker/fp8.py`): float8 e4m3 weights with one scale per 128 x 128 block, quantized after a plain
  load; the model runner's fused Triton GEMMs quantize activations per (token, 128-channel group) and use fp8
  tensor cores (CUDA, compute capability 8.9+); the same projections and experts as above, ~27 GB. On a CPU it
  runs the plain-torch reference ops (dequantize, then the model-dtype specs). Not a torchao tensor: `is_quantized`
  is False for it, and the engine captures CUDA graphs as for unquantized weights.
"""

from __future__ import annotations

import logging

import torch

from worker import fp8

log = logging.getLogger(__name__)

KINDS = ("none", "int4", "int8", "fp8")

# every text layer of the encoder and the decoder (the vision tower's layers stay as they are)
TEXT_LAYERS = r".*(language_model|decoder)\.layers\.\d+\."


def weight_config(kind: str):
    """The torchao config for one weight (int4, int8)."""
    if kind == "int4":
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig(version=2)
    raise ValueError(f"unknown quantization {kind!r} ({', '.join(KINDS)})")


def fqn_config(kind: str, prefix: str = TEXT_LAYERS):
    """Which weights get quantized, and how: torchao's FqnToConfig over the expert parameters and the projections
    of the layers whose names match `prefix` (a regex; "" for a single layer quantized on its own)."""
    from torchao.quantization import FqnToConfig

    cfg = weight_config(kind)
    return FqnToConfig({f"re:{prefix}experts\\.(gate_up_proj|down_proj)": cfg,
                        f"re:{prefix}(self_attn\\.[qkvo]_proj|mlp\\.(gate|up|down)_proj)": cfg})


def check_supported(kind: str, device: torch.device) -> None:
    """Fail early, with the reason, where a kind cannot run."""
    if kind not in KINDS:
        raise ValueError(f"unknown quantization {kind!r} ({', '.join(KINDS)})")
    if kind == "none":
        return
    if kind != "fp8":
        try:
            import torchao  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(f"quantization {kind!r} needs torchao: pip install 'dgserve[quant]'") from exc
    if kind == "int4" and device.type != "cuda":
        raise ValueError(f"quantization {kind!r} runs on CUDA only; use int8 on a CPU")
    if kind == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError("quantization 'fp8' needs compute capability 8.9 or newer (Ada, Hopper)")


def from_pretrained_kwargs(kind: str, device: torch.device) -> dict:
    """Extra `from_pretrained` arguments for a quantized load (empty for 'none', and for 'fp8': `after_load`)."""
    check_supported(kind, device)
    if kind in ("none", "fp8"):
        return {}
    from transformers import TorchAoConfig

    # transformers skips every tied weight by default, and DiffusionGemma's encoder and decoder layers share all of
    # theirs: name what to leave alone instead (the tied embedding / output head, the vision tower)
    keep = ["lm_head", "model.decoder.embed_tokens", "model.encoder.language_model.embed_tokens",
            "model.encoder.vision_tower", "model.encoder.embed_vision", "model.decoder.self_conditioning"]
    config = TorchAoConfig(quant_type=fqn_config(kind), modules_to_not_convert=keep)
    return {"quantization_config": config, "experts_implementation": "eager"}


def quantize_model(model, kind: str, prefix: str = TEXT_LAYERS) -> None:
    """Quantize an in-memory model in place (the same weights `from_pretrained_kwargs` would quantize).

    Encoder and decoder layers share their parameters: every module that used a weight ends up with the same
    quantized copy. With `prefix=""`, `model` may be a single text layer: materialising and quantizing one layer at
    a time keeps peak memory at the quantized size (bench/engine.py does, for the 26B-A4B at random weights).
    """
    if kind == "none":
        return
    check_supported(kind, next(model.parameters()).device)
    if kind == "fp8":
        fp8.quantize_model(model, prefix)
        return
    from torchao.quantization import quantize_

    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, name))
    before = {id(p): p for p in model.parameters()}
    quantize_(model, fqn_config(kind, prefix), filter_fn=None)
    for key, places in owners.items():  # one quantized copy per shared weight, wherever it is used
        if len(places) < 2:
            continue
        new = [getattr(m, n) for m, n in places if getattr(m, n) is not before[key]]
        if new:
            for m, n in places:
                setattr(m, n, new[0])
    if hasattr(model, "set_experts_implementation"):  # a whole model (a single layer: the caller sets it)
        model.set_experts_implementation("eager")


def after_load(model, kind: str) -> None:
    """What a load with `from_pretrained_kwargs(kind)` leaves to do: fp8 quantizes the loaded weights in place."""
    if kind == "fp8":
        quantize_model(model, kind)


def is_quantized_tensor(t: torch.Tensor) -> bool:
    """A torchao tensor subclass (as a parameter or its data)."""
    return type(t).__module__.startswith("torchao") or type(t.data).__module__.startswith("torchao")


def is_quantized(model) -> bool:
    """True when some weight is a torchao tensor (those run the plain-torch ops; fp8 weights are plain tensors)."""
    return any(is_quantized_tensor(p) for p in model.parameters())


def weight_bytes(model) -> int:
    """Bytes held by the model's unique weights, quantized ones at their packed size (fp8: with their scales)."""
    seen: set[int] = set()
    total = 0
    scales = [b for name, b in model.named_buffers() if name.endswith(fp8.SCALE_SUFFIX)]
    for p in [*model.parameters(), *scales]:
        t = p.data
        inner = [getattr(t, name) for name in getattr(t, "tensor_data_names", ())] or [t]
        inner += [getattr(t, name) for name in getattr(t, "optional_tensor_data_names", ())
                  if getattr(t, name, None) is not None]
        for x in inner:
            if x.data_ptr() not in seen:
                seen.add(x.data_ptr())
                total += x.numel() * x.element_size()
    return total
