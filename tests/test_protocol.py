"""The protocol package on its own (no processes): sampling defaults from a checkpoint's generation config, the
request-status machine, usage, and the rules both sides apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocol import contract

ROOT = Path(__file__).resolve().parents[1]


def test_reference_defaults_are_transformers_own():
    from transformers.models.diffusion_gemma import DiffusionGemmaGenerationConfig

    assert contract.sampling_defaults(DiffusionGemmaGenerationConfig()) == contract.REFERENCE_DEFAULTS
    assert contract.sampling_defaults({}) == contract.REFERENCE_DEFAULTS


@pytest.mark.parametrize("name", ["sudoku", "text"])
def test_sampling_defaults_read_the_json_file_and_the_config_class_alike(name):
    from transformers.models.diffusion_gemma import DiffusionGemmaGenerationConfig

    raw = json.loads((ROOT / "models" / name / "generation_config.json").read_text())
    loaded = DiffusionGemmaGenerationConfig.from_pretrained(ROOT / "models" / name)
    assert contract.sampling_defaults(raw) == contract.sampling_defaults(loaded)
    assert contract.eos_token_ids(raw) == contract.eos_token_ids(loaded) == tuple(raw["eos_token_id"])
    defaults = contract.sampling_defaults(raw)
    assert defaults["entropy_bound"] == raw["sampler_config"]["entropy_bound"]  # nested, as the reference reads it
    assert defaults["max_denoising_steps"] == raw["max_denoising_steps"]


def test_default_sampling_takes_overrides_and_eos_from_the_config():
    config = {"t_min": 0.5, "t_max": 1.5, "eos_token_id": 7, "sampler_config": {"entropy_bound": 0.3}}
    params = contract.default_sampling(config, seed=4, max_new_tokens=81)
    assert (params.t_min, params.t_max, params.entropy_bound, params.eos_token_ids) == (0.5, 1.5, 0.3, (7,))
    assert (params.seed, params.max_new_tokens, params.max_denoising_steps) == (4, 81, 48)
    assert contract.eos_token_ids({}, {"text_config": {"eos_token_id": [1, 106]}}) == (1, 106)
    assert contract.eos_token_ids({}) == ()
