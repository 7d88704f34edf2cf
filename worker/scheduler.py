"""The scheduler: every request's record, admission, commits, cancels; it hands the engine a plan per step.

Between steps, in one order: drop cancelled and finished rows (`finish`: a stop string found above the engine), admit
waiting requests while slots are free (a request that can never fit fails alone), collect canvases committed at the
previous step; after the step, apply the sampler's decisions to each row: its step event, and a commit (then its next
canvas, or its end) when the canvas stops; a row past its running deadline ends there.

A `Row` is the one record of a request on the worker. Rows occupy KV pool slots 0..n-1 (slot = index in `rows`):
a leaving row's slot is filled by the last row, so a decoder step reads the pool's first n slots.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from protocol import contract
from worker.kvcache import KVPool
from worker.types import CanvasEvent, DoneEvent, EngineEvent, EngineRequest, ErrorEvent, StepEvent


@dataclass(eq=False)
class Row:
    req: EngineRequest
    slot: int
    generator: torch.Generator
    canvas: torch.Tensor  # (L,) current noisy canvas
    prev_draft: torch.Tensor  # (L,) previous step's argmax draft (-1 before the first step)
    soft: torch.Tensor | None  # (L, H) self-conditioning signal from the previous step, model dtype
    fixed: torch.Tensor | None  # (L,) bool template mask (first canvas only)
    fixed_ids: torch.Tensor | None  # (L,) template ids
    run: int = 0  # consecutive unchanged drafts
    canvas_index: int = 0
    step_in_canvas: int = 0
    total_steps: int = 0
    tokens: list[int] = field(default_factory=list)
    needs_encode: list[int] | None = None  # committed canvas waiting to be encoded
    admitted_at: float = field(default_factory=time.monotonic)  # the running deadline counts from here
    canvas_started: float = field(default_factory=time.monotonic)  # admission, then the previous commit

    @property
    def request_id(self) -> str:
        return self.req.request_id


@dataclass
class StepPlan:
    events: list[EngineEvent]  # requests that ended while scheduling (cancelled, too long)
    prompts: list[Row]  # admitted this step: encode their prompts, then their first canvas
    commits: list[Row]  # committed a canvas at the previous step: encode it, then their next canvas


@dataclass
class Decisions:
    """What the host needs of one step's decisions, per row (lists, read once per step)."""

    draft: list[list[int]]
    accepted: list[list[bool]]
    entropy: list[list[float]]
    mean_entropy: list[float]
    run: list[int]
    stop: list[bool]


class Scheduler:
    def __init__(self, pool: KVPool, max_batch: int, max_context: int, canvas_length: int, vocab_size: int,
                 device: torch.device):
        self.pool = pool
        self.max_batch, self.max_context = max_batch, max_context
        self.canvas_length, self.vocab_size, self.device = canvas_length, vocab_size, device
        self.rows: list[Row] = []  # rows[i].slot == i
        self.pending: list[EngineRequest] = []
        self.cancelled: set[str] = set()
        self.finishing: dict[str, tuple[str, int]] = {}  # request id -> (finish reason, tokens kept)

    # ---------------------------------------------------------------- control
    def add(self, request: EngineRequest) -> None:
        self.pending.append(request)

    def cancel(self, request_id: str) -> None:
        self.cancelled.add(request_id)

    def finish(self, request_id: str, reason: str, keep_tokens: int) -> None:
        self.finishing[request_id] = (reason, keep_tokens)

    def has_work(self) -> bool:
        return bool(self.rows or self.pending)

    # ---------------------------------------------------------------- schedule
    def schedule(self) -> StepPlan:
        events: list[EngineEvent] = []
        self._drop_cancelled(events)
        prompts = self._admit(events)
        commits = [r for r in self.rows if r.needs_encode is not None]
        return StepPlan(events, prompts, commits)

    def _drop_cancelled(self, events: list[EngineEvent]) -> None:
        """Cancelled requests end with an error, finished rows (`finish`) with their tokens cut where asked."""
        for row in [r for r in self.rows if r.request_id in self.finishing]:
            reason, keep = self.finishing[row.request_id]
            events.append(DoneEvent(row.request_id, row.tokens[:keep], reason, len(row.req.prompt_ids),
                                    row.canvas_index, row.total_steps))
            self.release(row)
        self.finishing.clear()
        if not self.cancelled:
            return
        for req in [p for p in self.pending if p.request_id in self.cancelled]:
            self.pending.remove(req)
            events.append(ErrorEvent(req.request_id, contract.CANCELLED, "request cancelled"))
        for row in [r for r in self.rows if r.request_id in self.cancelled]:
            events.append(ErrorEvent(row.request_id, contract.CANCELLED, "request cancelled"))
            self.release(row)
        self.cancelled.clear()

    def _admit(self, events: list[EngineEvent]) -> list[Row]:
        admitted: list[Row] = []
        while self.pending and len(self.rows) < self.max_batch:
            req = self.pending.pop(0)
            needed = contract.context_needed(len(req.prompt_ids), req.params.max_new_tokens, self.canvas_length)
            if not req.prompt_ids or needed > self.max_context:
                events.append(ErrorEvent(
                    req.request_id, "too_long",
                    f"prompt ({len(req.prompt_ids)} tokens) + max_new_tokens rounded up to whole canvases "
                    f"({needed} tokens) exceeds max_context {self.max_context}",
                ))
                continue
            generator = torch.Generator(device=self.device)
            generator.manual_seed(req.params.seed)
            row = Row(req=req, slot=len(self.rows), generator=generator, canvas=torch.empty(0),
                      prev_draft=torch.empty(0), soft=None, fixed=None, fixed_ids=None)
            if req.template:
                row.fixed, row.fixed_ids = self._template_tensors(req.template)
            self.pool.release(row.slot)
            self.rows.append(row)
            admitted.append(row)
        return admitted

    def release(self, row: Row) -> None:
        """Remove a row, keeping active slots contiguous (the last row moves into the hole)."""
        slot = row.slot
        last = self.rows.pop()
        if last is not row:
            self.pool.move(last.slot, slot)
            last.slot = slot
            self.rows[slot] = last
        self.pool.release(len(self.rows))

    def fail(self, rows: list[Row], code: str, message: str, events: list[EngineEvent]) -> None:
        for row in rows:
            events.append(ErrorEvent(row.request_id, code, message))
            self.release(row)

    def _template_tensors(self, template: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        fixed = torch.zeros(self.canvas_length, dtype=torch.bool)
        ids = torch.zeros(self.canvas_length, dtype=torch.long)
        for pos, tok in template.items():
            fixed[pos] = True
            ids[pos] = tok
        return fixed.to(self.device), ids.to(self.device)

    def new_canvas(self, row: Row) -> None:
        """A fresh canvas of uniformly random tokens (template positions clamped on the first canvas)."""
        L = self.canvas_length
        canvas = torch.randint(0, self.vocab_size, (1, L), generator=row.generator, device=self.device)[0]
        if row.fixed is not None and row.canvas_index == 0:
            canvas = torch.where(row.fixed, row.fixed_ids, canvas)  # type: ignore[arg-type]
        row.canvas = canvas
        row.prev_draft = torch.full((L,), -1, dtype=torch.long, device=self.device)
        row.soft = None
        row.run = 0
        row.step_in_canvas = 0
        row.needs_encode = None

    def template(self, rows: list[Row]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B, L) template mask and ids of the rows on their first canvas, or None when no row has one."""
        if all(r.fixed is None or r.canvas_index > 0 for r in rows):
            return None, None
        L = self.canvas_length
        no_mask = torch.zeros(L, dtype=torch.bool, device=self.device)
        no_ids = torch.zeros(L, dtype=torch.long, device=self.device)
        on = [r.fixed is not None and r.canvas_index == 0 for r in rows]
        return (torch.stack([r.fixed if o else no_mask for r, o in zip(rows, on, strict=True)]),  # type: ignore[misc]
                torch.stack([r.fixed_ids if o else no_ids for r, o in zip(rows, on, strict=True)]))  # type: ignore[misc]

    # ------------------------------------------------------------------ update
    def update(self, rows: list[Row], canvas: torch.Tensor, draft: torch.Tensor, soft: torch.Tensor,
               host: Decisions) -> list[EngineEvent]:
        """Apply one step's decisions: each row's next state and step event; commits; finished rows leave, and so do
        rows with non-finite entropies or past their running deadline (each with an error)."""
        events: list[EngineEvent] = []
        finished: list[Row] = []
        for i, row in enumerate(rows):
            if not math.isfinite(host.mean_entropy[i]):  # never a NaN step: JSON has none, followers would choke
                events.append(ErrorEvent(row.request_id, "numerical_error", "the sampler's entropies are not "
                                         "finite (are the temperatures too low for this model?)"))
                finished.append(row)
                continue
            row.step_in_canvas += 1
            row.total_steps += 1
            row.run = host.run[i]
            row.canvas, row.prev_draft, row.soft = canvas[i], draft[i], soft[i]
            events.append(StepEvent(row.request_id, row.canvas_index, row.step_in_canvas, host.draft[i],
                                    sum(host.accepted[i]), float(host.mean_entropy[i]), host.accepted[i],
                                    host.entropy[i]))
            if host.stop[i] or row.step_in_canvas >= row.req.params.max_denoising_steps:
                if self._commit(row, host.draft[i], events):
                    finished.append(row)
                    continue
            if overrun := self._past_deadline(row):
                events.append(ErrorEvent(row.request_id, "deadline_exceeded", overrun))
                finished.append(row)
        for row in finished:
            self.release(row)
        return events

    @staticmethod
    def _past_deadline(row: Row) -> str | None:
        """Why a running request must end now (its running deadline), or None."""
        req = row.req
        if req.max_steps is not None and row.total_steps >= req.max_steps:
            return f"the request ran {row.total_steps} denoising steps, the limit per request of this deployment"
        elapsed = time.monotonic() - row.admitted_at
        if req.max_running_s is not None and elapsed > req.max_running_s:
            return f"the request ran for {elapsed:.0f} s, past the limit of {req.max_running_s:g} s per request"
        return None

    def _commit(self, row: Row, draft: list[int], events: list[EngineEvent]) -> bool:
        """Commit the draft as the row's next canvas. Returns True when the request is finished."""
        params = row.req.params
        eos = set(params.eos_token_ids)
        cut = next((j for j, t in enumerate(draft) if t in eos), None)
        budget = params.max_new_tokens - len(row.tokens)
        kept = draft[: cut if cut is not None else len(draft)][:budget]
        row.tokens.extend(kept)
        now = time.monotonic()
        events.append(CanvasEvent(row.request_id, row.canvas_index, kept, row.step_in_canvas, now - row.canvas_started))
        row.canvas_started = now
        row.canvas_index += 1
        if cut is not None and cut <= budget:
            reason = "stop"
        elif len(row.tokens) >= params.max_new_tokens:
            reason = "length"
        else:
            row.needs_encode = draft  # the reference encodes the whole argmax canvas
            return False
        events.append(DoneEvent(row.request_id, list(row.tokens), reason, len(row.req.prompt_ids),
                                row.canvas_index, row.total_steps))
        return True
