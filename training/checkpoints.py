"""Small DiffusionGemma checkpoints that this project builds itself.

Everything here produces a directory that loads through exactly the path the real
`google/diffusiongemma-26B-A4B-it` loads through: `DiffusionGemmaForBlockDiffusion.from_pretrained`
and `AutoTokenizer.from_pretrained`. Nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    DiffusionGemmaConfig,
    DiffusionGemmaForBlockDiffusion,
    DiffusionGemmaGenerationConfig,
    Gemma4VisionConfig,
    PreTrainedTokenizerFast,
)

# Ids 0..8 are the same in every checkpoint we build, so that configs and templates agree.
SPECIAL_TOKENS = [
    "<pad>",  # 0: pad (matches the real checkpoint)
    "<eos>",  # 1: end of sequence (matches the real checkpoint)
    "<bos>",  # 2: beginning of sequence (matches the real checkpoint)
    "<unk>",  # 3
    "<start_of_turn>",  # 4
    "<end_of_turn>",  # 5: also an EOS for chat
    "<image>",  # 6: image placeholder (keeps image_token_id inside the vocabulary)
    "<start_of_image>",  # 7
    "<end_of_image>",  # 8
]
PAD_ID, EOS_ID, BOS_ID, UNK_ID, SOT_ID, EOT_ID, IMAGE_ID, BOI_ID, EOI_ID = range(9)

# Gemma's turn format, so that `messages` behave as they do with the real checkpoint.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=2, head_dim=16,
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained deterministically on `texts`."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap_tokenizer(tok)


def char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character of `alphabet` (after the special tokens)."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    # like Gemma's: a plain encode starts with <bos>; chat templates write their own
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(vocab_size: int, canvas_length: int, **text_overrides: Any) -> DiffusionGemmaConfig:
    """The 26B-A4B architecture scaled down: same layer pattern, MoE, k=v global layers, softcap."""
    text = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_global_key_value_heads=1, head_dim=16,
        global_head_dim=32, moe_intermediate_size=32, num_experts=4, top_k_experts=2,
        sliding_window=64, attention_k_eq_v=True, max_position_embeddings=8192,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
    )
    text.update(text_overrides)
    vision = Gemma4VisionConfig(**TINY_VISION).to_dict()
    return DiffusionGemmaConfig(
        text_config=text, vision_config=vision, canvas_length=canvas_length,
        image_token_id=IMAGE_ID, boi_token_id=BOI_ID, eoi_token_id=EOI_ID,
    )


def generation_config(**overrides: Any) -> DiffusionGemmaGenerationConfig:
    params: dict[str, Any] = dict(
        max_new_tokens=256, max_denoising_steps=48, t_min=0.4, t_max=0.8,
        stability_threshold=1, confidence_threshold=0.005,
        sampler_config={"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
        eos_token_id=[EOS_ID, EOT_ID], pad_token_id=PAD_ID, bos_token_id=BOS_ID,
    )
    params.update(overrides)
    return DiffusionGemmaGenerationConfig(**params)


def save_checkpoint(
    model: DiffusionGemmaForBlockDiffusion,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: str | Path,
    extra: dict[str, Any] | None = None,
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if extra:
        (out / "dgserve.json").write_text(json.dumps(extra, indent=1, sort_keys=True) + "\n")
    return out


def random_model(config: DiffusionGemmaConfig, seed: int) -> DiffusionGemmaForBlockDiffusion:
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    return model


SAMPLE_TEXT = (
    "In the beginning was the word, and the word was with the writer. The canvas is written at once and "
    "refined in parallel: every position changes, settles and locks in, step by step. A block diffusion "
    "model reads the prompt once, then denoises a whole block of text over a few dozen steps. "
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
)


def build_random_checkpoint(out_dir: str | Path, seed: int = 0, canvas_length: int = 32) -> Path:
    """A deterministic, untrained checkpoint: the default until trained ones exist, and the test fixture."""
    tokenizer = train_tokenizer([SAMPLE_TEXT] * 4, vocab_size=512)
    config = tiny_config(vocab_size=len(tokenizer), canvas_length=canvas_length)
    model = random_model(config, seed)
    model.generation_config = generation_config(max_new_tokens=2 * canvas_length, max_denoising_steps=8)
    return save_checkpoint(model, tokenizer, out_dir, extra={"kind": "random", "seed": seed})
