"""Turning engine events into the contract's events: token ids to text, kept consistent.

The texts of the committed canvases, concatenated, equal the final text: each canvas's text is what
decoding everything committed so far adds to what was already emitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol import contract
from worker.types import CanvasEvent, DoneEvent, EngineEvent, ErrorEvent, StepEvent

_INCOMPLETE = "\ufffd"  # a multi-byte character cut by a canvas boundary decodes to U+FFFD


@dataclass
class _Stream:
    tokens: list[int] = field(default_factory=list)
    emitted: str = ""


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._streams: dict[str, _Stream] = {}
        self._pieces: dict[int, str] = {}  # token id -> its text alone, filled as ids are seen

    def pieces(self, ids: list[int]) -> list[str]:
        missing = sorted({i for i in ids if i not in self._pieces})
        if missing:
            texts = self.tokenizer.batch_decode([[i] for i in missing], skip_special_tokens=False)
            self._pieces.update(zip(missing, texts, strict=True))
        return [self._pieces[i] for i in ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def emitted(self, request_id: str) -> str:
        stream = self._streams.get(request_id)
        return stream.emitted if stream else ""

    def tokens(self, request_id: str) -> list[int]:
        stream = self._streams.get(request_id)
        return list(stream.tokens) if stream else []

    def forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def convert(self, event: EngineEvent, final_follows: bool = False) -> contract.BaseModel:
        """One engine event -> one contract event. `final_follows`: the request ends with this canvas."""
        if isinstance(event, StepEvent):
            return contract.Step.model_construct(  # built here from trusted values: no validation cost
                request_id=event.request_id, canvas=event.canvas, step=event.step,
                draft_ids=event.draft_ids, draft_text=self.decode(event.draft_ids),
                draft_tokens=self.pieces(event.draft_ids), accepted=event.accepted,
                accepted_mask=[int(a) for a in event.accepted_mask], mean_entropy=event.mean_entropy,
                entropy=[round(h, 4) for h in event.entropy],
            )
        if isinstance(event, CanvasEvent):
            stream = self._streams.setdefault(event.request_id, _Stream())
            stream.tokens.extend(event.token_ids)
            full = self.decode(stream.tokens)
            if not final_follows:
                full = full.rstrip(_INCOMPLETE)
            delta = full[len(stream.emitted):] if full.startswith(stream.emitted) else ""
            stream.emitted += delta
            return contract.Canvas(request_id=event.request_id, canvas=event.canvas,
                                   token_ids=event.token_ids, text=delta, steps=event.steps)
        if isinstance(event, DoneEvent):
            stream = self._streams.pop(event.request_id, _Stream())
            completion = len(event.token_ids)
            usage = contract.Usage(
                prompt_tokens=event.prompt_tokens, completion_tokens=completion, canvases=event.canvases,
                denoising_steps=event.denoising_steps,
                tokens_per_forward=round(completion / max(event.denoising_steps, 1), 4),
            )
            return contract.Done(request_id=event.request_id, text=stream.emitted, token_ids=event.token_ids,
                                 finish_reason=event.finish_reason, usage=usage)
        if isinstance(event, ErrorEvent):
            self.forget(event.request_id)
            return contract.Error(request_id=event.request_id, code=event.code, message=event.message)
        raise TypeError(f"unknown engine event {event!r}")
