"""Turning engine events into the contract's events: token ids to text, kept consistent, and stop strings found.

The texts of the committed canvases, concatenated, equal the final text: each canvas's text is what it adds to the
text already sent. Held back until a later canvas: a character a canvas boundary cuts in two, and an ending that may
be the start of a stop string (so that a stop string across canvases is never half sent). A canvas is decoded after
the previous one (a word, a multi-byte character or a tokenizer's spacing may span the boundary), never after the
whole request: the tokens are the engine's (its `Row`); the detokenizer keeps the text, its offsets, and a window of
tokens: the last canvas whose text is complete (the context) and those after it whose last character is not yet.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

from protocol import contract
from worker.types import CanvasEvent, DoneEvent, ErrorEvent, StepEvent

_INCOMPLETE = "\ufffd"  # a multi-byte character cut by a canvas boundary decodes to U+FFFD


@dataclass
class _Text:
    """One request's text so far."""

    text: str = ""  # decoded so far (whole characters)
    sent: int = 0  # how much of `text` the canvases' events carried; the rest may begin a stop string
    window: list[int] = field(default_factory=list)  # context, then the pending tokens: decoded together
    context: int = 0  # window[:context] is complete text already in `text`, decoded only as what comes before
    pending_text: int = 0  # characters of the pending tokens' text already in `text` (their last one is cut)
    tokens_before: int = 0  # committed tokens before the window

    def advance(self, complete: bool, pending_text: int) -> None:
        """After a canvas: once its text is complete, its tokens (and any pending before them) become the context."""
        if complete:
            self.tokens_before += self.context
            self.window = self.window[self.context:]
            self.context, self.pending_text = len(self.window), 0
        else:
            self.pending_text = max(self.pending_text, pending_text)


@dataclass(frozen=True)
class CanvasText:
    """A committed canvas as the contract's event, and where a stop string ended the request (None: it goes on)."""

    event: contract.Canvas
    keep_tokens: int | None = None  # the request's tokens the kept text covers


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[str, _Text] = {}
        self._pieces: dict[int, str] = {}  # token id -> its text alone, filled as ids are seen

    def pieces(self, ids: list[int]) -> list[str]:
        missing = sorted({i for i in ids if i not in self._pieces})
        if missing:
            texts = self.tokenizer.batch_decode([[i] for i in missing], skip_special_tokens=False)
            self._pieces.update(zip(missing, texts, strict=True))
        return [self._pieces[i] for i in ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def forget(self, request_id: str) -> None:
        self._texts.pop(request_id, None)

    # ---------------------------------------------------------------- events
    def step(self, event: StepEvent) -> contract.Step:
        return contract.Step.model_construct(  # built here from trusted values: no validation cost
            request_id=event.request_id, canvas=event.canvas, step=event.step,
            draft_ids=event.draft_ids, draft_text=self.decode(event.draft_ids),
            draft_tokens=self.pieces(event.draft_ids), accepted=event.accepted,
            accepted_mask=[int(a) for a in event.accepted_mask], mean_entropy=event.mean_entropy,
            entropy=[round(h, 4) for h in event.entropy],
        )

    def canvas(self, event: CanvasEvent, final: bool, stop: Sequence[str] = ()) -> CanvasText:
        """A committed canvas. `final`: the request ends with it (a character it cuts is not completed later).
        With `stop`, the text ends before the first stop string found in it, and `keep_tokens` is set."""
        t = self._texts.setdefault(event.request_id, _Text())
        t.window += event.token_ids
        before, raw = self.decode(t.window[: t.context]), self.decode(t.window)
        full = raw if final else raw.rstrip(_INCOMPLETE)  # a character cut at the end waits for the next canvas
        new = full[len(before) + t.pending_text:] if full.startswith(before) else ""
        t.text += new
        keep, end = None, len(t.text) if final else len(t.text) - _stop_prefix(t.text, stop)
        if (cut := _first_stop(t.text, len(t.text) - len(new), stop)) is not None:
            keep = t.tokens_before + _covering(self.decode, t.window, cut - (len(t.text) - len(full)))
            t.text = t.text[:cut]
            end = cut
        sent, t.sent = t.text[t.sent:end], max(t.sent, end)
        t.advance(complete=len(full) == len(raw), pending_text=len(full) - len(before))
        canvas = contract.Canvas(request_id=event.request_id, canvas=event.canvas, token_ids=event.token_ids,
                                 text=sent, steps=event.steps)
        return CanvasText(canvas, keep)

    def done(self, event: DoneEvent) -> contract.Done:
        text = self._texts.pop(event.request_id, _Text()).text
        usage = contract.Usage.of(event.prompt_tokens, len(event.token_ids), event.canvases, event.denoising_steps)
        return contract.Done(request_id=event.request_id, text=text, token_ids=event.token_ids,
                             finish_reason=event.finish_reason, usage=usage)  # type: ignore[arg-type]

    def error(self, event: ErrorEvent) -> contract.Error:
        self.forget(event.request_id)
        return contract.Error(request_id=event.request_id, code=event.code, message=event.message)


def _first_stop(text: str, start: int, stop: Sequence[str]) -> int | None:
    """Where the first stop string in `text` begins, among those that end past `start` (the new text), or None."""
    stops = [s for s in stop if s]
    if not stops:
        return None
    lo = max(0, start - max(map(len, stops)) + 1)
    cuts = [i for s in stops if (i := text.find(s, lo)) >= 0]
    return min(cuts) if cuts else None


def _stop_prefix(text: str, stop: Sequence[str]) -> int:
    """How many of the last characters of `text` may begin a stop string (the longest such ending)."""
    longest = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def _covering(decode, ids: list[int], chars: int) -> int:
    """The fewest of `ids` whose text (whole characters only) holds its first `chars` characters."""
    if chars <= 0:  # the stop string began before these ids (it is longer than a canvas's text): keep none of them
        return 0
    n = bisect.bisect_left(range(len(ids) + 1), chars, key=lambda n: len(decode(ids[:n]).rstrip(_INCOMPLETE)))
    return min(n, len(ids))
