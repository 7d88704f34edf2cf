"""The worker's detokenizer on its own: canvases decoded one after another (never the whole request again) add up to
the whole text, for a byte-level tokenizer (characters cut by canvas boundaries) and a SentencePiece-style one
(spacing that depends on what came before); stop strings are cut where they begin and never half sent."""

from __future__ import annotations

import random

import pytest
from tokenizers import SentencePieceBPETokenizer
from transformers import PreTrainedTokenizerFast

from training.checkpoints import SAMPLE_TEXT, train_tokenizer
from worker.text import Detokenizer
from worker.types import CanvasEvent, DoneEvent

TEXT = "The naïve café served crème brûlée — 日本語のテキスト 🙂🙃 and then, the wonderful end. "


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tokenizer(request) -> PreTrainedTokenizerFast:
    if request.param == "byte_level":  # the embedded checkpoints' kind: multi-byte characters span several tokens
        return train_tokenizer([SAMPLE_TEXT] * 4, vocab_size=400)
    sp = SentencePieceBPETokenizer()  # "▁word": decoded alone, a leading word loses its space
    sp.train_from_iterator([SAMPLE_TEXT, TEXT] * 4, vocab_size=300, show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split(ids: list[int], rnd: random.Random, most: int = 7) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rnd.randint(1, most)
        out.append(ids[i:i + n])
        i += n
    return out


def send(detok: Detokenizer, canvases: list[list[int]], stop: tuple[str, ...] = (), rid: str = "r"):
    """Every canvas through the detokenizer, the last marked final; the texts sent and the first `keep_tokens`."""
    texts, keep = [], None
    for k, ids in enumerate(canvases):
        out = detok.canvas(CanvasEvent(rid, k, ids, 1), final=k == len(canvases) - 1, stop=stop)
        texts.append(out.event.text)
        if out.keep_tokens is not None:
            keep = out.keep_tokens
            break
    return texts, keep


def test_canvas_texts_add_up_to_the_whole_text(tokenizer):
    detok, rnd = Detokenizer(tokenizer), random.Random(0)
    ids = ids_of(tokenizer, TEXT * 3)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert "\ufffd" not in whole
    for trial in range(150):
        canvases = split(ids, rnd)
        texts, _ = send(detok, canvases, rid=f"r{trial}")
        assert "".join(texts) == whole, trial
        assert not any(t.endswith("\ufffd") for t in texts)  # a cut character waits for its canvas to complete it
        done = detok.done(DoneEvent(f"r{trial}", ids, "length", 3, len(canvases), len(canvases)))
        assert done.text == whole and done.usage.completion_tokens == len(ids)


def test_random_ids_add_up_to_their_decode(tokenizer):
    """Any ids at all (invalid byte sequences included): what the canvases carry is what decoding them all gives."""
    detok, rnd = Detokenizer(tokenizer), random.Random(1)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    for trial in range(150):
        ids = [rnd.choice(vocab) for _ in range(rnd.randint(1, 60))]
        texts, _ = send(detok, split(ids, rnd), rid=f"x{trial}")
        assert "".join(texts) == tokenizer.decode(ids, skip_special_tokens=True), (trial, ids)


@pytest.mark.parametrize("stop", ["wonderful", "rful end", "日本"])
def test_a_stop_string_across_canvases_is_never_half_sent(tokenizer, stop):
    """At every split of the text, the canvases' texts add up to the text before the first stop string, and the
    tokens kept are the fewest whose text holds it."""
    detok = Detokenizer(tokenizer)
    ids = ids_of(tokenizer, TEXT)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    cut = whole.find(stop)
    assert cut > 0
    for at in range(1, len(ids)):
        texts, keep = send(detok, [ids[:at], ids[at:]], stop=(stop, "never there"), rid=f"s{at}")
        assert "".join(texts) == whole[:cut], (at, texts)
        assert keep is not None and tokenizer.decode(ids[:keep]).startswith(whole[:cut]), (at, keep)
        assert len(tokenizer.decode(ids[:keep - 1])) < cut, (at, keep)
        assert detok.done(DoneEvent(f"s{at}", ids[:keep], "stop_string", 3, 2, 2)).text == whole[:cut]


def test_a_held_back_ending_that_is_no_stop_string_is_sent_with_the_next_canvas(tokenizer):
    detok = Detokenizer(tokenizer)
    ids = ids_of(tokenizer, TEXT)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    at = next(n for n in range(len(ids)) if tokenizer.decode(ids[:n]).endswith("then, the"))
    texts, keep = send(detok, [ids[:at], ids[at:]], stop=(" the wonders",))
    assert keep is None and texts[0].endswith("then,") and "".join(texts) == whole
