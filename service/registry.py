"""The models the gateway serves: tokenizer, chat template and sampling defaults of each.

Only tokenizer and config files are read (never weights), through transformers' tokenizer classes
that do not import torch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

# transformers' DiffusionGemmaGenerationConfig defaults, used where a checkpoint sets nothing
REFERENCE_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 256,
    "max_denoising_steps": 48,
    "entropy_bound": 0.1,
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
}


def _read_json(source: str, filename: str) -> dict[str, Any]:
    local = Path(source)
    if local.is_dir():
        path = local / filename
        return json.loads(path.read_text()) if path.exists() else {}
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(source, filename)).read_text())
    except EntryNotFoundError:
        return {}


@dataclass
class ServedModel:
    name: str
    source: str
    tokenizer: PreTrainedTokenizerFast
    canvas_length: int
    defaults: dict[str, Any]
    eos_token_ids: tuple[int, ...]
    extra: dict[str, Any]

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return list(ids)

    def token_id(self, text: str) -> int | None:
        """The id of a single-token string, or None."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None


def load_model(name: str, source: str) -> ServedModel:
    config = _read_json(source, "config.json")
    generation = _read_json(source, "generation_config.json")
    defaults = dict(REFERENCE_DEFAULTS)
    for key in REFERENCE_DEFAULTS:
        if generation.get(key) is not None:
            defaults[key] = generation[key]
    sampler = generation.get("sampler_config") or {}
    if sampler.get("entropy_bound") is not None:
        defaults["entropy_bound"] = sampler["entropy_bound"]
    eos = generation.get("eos_token_id", config.get("text_config", {}).get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    log.info("model %s from %s: canvas %s, defaults %s", name, source, config.get("canvas_length"), defaults)
    return ServedModel(
        name=name, source=source, tokenizer=tokenizer, canvas_length=int(config.get("canvas_length", 256)),
        defaults=defaults, eos_token_ids=eos_ids, extra=_read_json(source, "dgserve.json"),
    )


class Registry:
    def __init__(self, models: dict[str, ServedModel], default: str):
        if default not in models:
            raise ValueError(f"default model {default!r} is not among {sorted(models)}")
        self.models = models
        self.default = default

    @classmethod
    def load(cls, paths: dict[str, str], default: str) -> Registry:
        return cls({name: load_model(name, src) for name, src in paths.items()}, default)

    def get(self, name: str | None) -> ServedModel | None:
        return self.models.get(name or self.default)
