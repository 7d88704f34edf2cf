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

from protocol import contract

log = logging.getLogger(__name__)


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
    defaults = contract.sampling_defaults(generation)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    log.info("model %s from %s: canvas %s, defaults %s", name, source, config.get("canvas_length"), defaults)
    return ServedModel(
        name=name, source=source, tokenizer=tokenizer, canvas_length=int(config.get("canvas_length", 256)),
        defaults=defaults, eos_token_ids=contract.eos_token_ids(generation, config),
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
