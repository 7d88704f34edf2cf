"""The engine: step-level continuous batching of DiffusionGemma block diffusion.

Every call to `step()` does, in this order: drop cancelled rows, admit new requests (encode their
prompts), encode canvases committed at the previous step, run ONE batched decoder forward over every
active row, sample, and return the events of that step (one `StepEvent` per row, plus `CanvasEvent`,
`DoneEvent` for rows that committed or finished). Rows join and leave between steps; each row follows
its own temperature schedule, parameters, canvas count and random generator.

No I/O here: the runner around the engine talks to Redis.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from worker import sampler
from worker.graphs import StaticEncode, StaticStep, buckets_for
from worker.kvcache import DecoderCacheView, EncoderBatch, KVPool, StaticEncoderCache, _LayerView
from worker.quantize import is_quantized
from worker.types import (
    CanvasEvent,
    DoneEvent,
    EngineEvent,
    EngineRequest,
    ErrorEvent,
    StepEvent,
)

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_batch: int = 8  # rows decoded together (also the KV pool's slot count)
    max_context: int = 2048  # prompt + generated tokens per request
    sample_chunk_rows: int = 4  # rows whose full-vocabulary logits are alive at once
    # decoder steps: "eager" (shapes follow the batch), "static" (fixed bucket shapes, run eagerly:
    # the CPU check of the graph path), "graphs" (fixed shapes captured as CUDA graphs), "auto"
    # ("graphs" on CUDA unless the weights are quantized, "eager" elsewhere)
    decode_mode: str = "auto"
    # sampler: "exact" (transformers' ops and multinomial draws: the reference's tokens for a seed),
    # "fast" (the same ops, inverse-CDF draws: several times faster than multinomial on a CPU),
    # "fused" (one Triton pass over the logits, Gumbel-max draws from the request's seed), "auto"
    # ("fused" on CUDA with Triton, "fast" elsewhere)
    sampler: str = "auto"


@dataclass
class _Row:
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


class _Timer:
    """Wall-clock laps with a device sync before each (profiling only)."""

    def __init__(self, device: torch.device):
        import time

        self.device, self._clock = device, time.perf_counter
        self._sync()
        self.last = self._clock()
        self.laps: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lap(self, name: str) -> None:
        self._sync()
        now = self._clock()
        self.laps[name] = (now - self.last) * 1e3
        self.last = now


class Engine:
    def __init__(self, model, config: EngineConfig | None = None):
        self.model = model
        self.config = config or EngineConfig()
        self.model_config = model.config
        self.text_config = model.config.get_text_config(decoder=True)
        self.canvas_length: int = model.config.canvas_length
        self.vocab_size: int = self.text_config.vocab_size
        self.device = next(model.parameters()).device
        self.dtype = model.model.decoder.embed_tokens.weight.dtype
        mode = self.config.decode_mode
        self.quantized = is_quantized(model)
        if mode == "auto":
            # quantized experts run transformers' per-expert loop, which reads the hit experts on the host:
            # nothing a CUDA graph can capture
            mode = "graphs" if self.device.type == "cuda" and not self.quantized else "eager"
        if mode == "graphs" and self.device.type != "cuda":
            raise ValueError("decode_mode 'graphs' needs a CUDA device")
        self.decode_mode = mode
        fixed_shapes = mode in ("static", "graphs")
        self.pool = KVPool(self.text_config, self.config.max_batch, self.config.max_context, self.device, self.dtype,
                           spare=fixed_shapes)
        self.rows: list[_Row] = []  # rows[i].slot == i
        self.pending: list[EngineRequest] = []
        self.cancelled: set[str] = set()
        self._eager = model.config._attn_implementation == "eager"
        self.steps_run = 0
        # batched forward passes by (pass, path): pass is decoder / canvas_encode / prompt_encode, path is graph
        # (CUDA-graph replay), static (fixed shapes, run eagerly) or eager; exported as dgserve:engine_forwards
        self.forwards: Counter[tuple[str, str]] = Counter()
        self.profile: list[dict[str, float]] | None = None  # set to [] to record per-step timings (syncs!)
        self.sampler_mode = self._resolve_sampler(self.config.sampler)
        self.static_steps: dict[int, StaticStep] = {}
        self.static_encodes: dict[int, StaticEncode] = {}
        if fixed_shapes:
            self._build_static_steps(capture=mode == "graphs")

    def _resolve_sampler(self, mode: str) -> str:
        if mode == "auto":
            from worker import fused

            usable = fused.HAVE_TRITON and self.device.type == "cuda" and self.dtype in fused.SUPPORTED_DTYPES
            return "fused" if usable else "fast"
        if mode not in ("exact", "fast", "fused"):
            raise ValueError(f"unknown sampler {mode!r} (exact, fast, fused, auto)")
        return mode

    # ----------------------------------------------------------------- control
    @property
    def free_slots(self) -> int:
        return self.config.max_batch - len(self.rows) - len(self.pending)

    @property
    def active(self) -> int:
        return len(self.rows)

    def add(self, request: EngineRequest) -> None:
        """Queue a request; it joins the batch at the next step."""
        self.pending.append(request)

    def cancel(self, request_id: str) -> None:
        """Mark a request; it leaves the batch at the next step."""
        self.cancelled.add(request_id)

    def has_work(self) -> bool:
        return bool(self.rows or self.pending)

    # ------------------------------------------------------------------- step
    def _no_autograd(self):
        # torchao's quantized tensors keep version counters, which inference-mode tensors lack: no_grad for them
        return torch.no_grad() if self.quantized else torch.inference_mode()

    def step(self) -> list[EngineEvent]:
        with self._no_autograd():
            return self._step()

    def _step(self) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        self._drop_cancelled(events)
        self._admit(events)
        self._encode_committed(events)
        if not self.rows:
            return events
        try:
            events.extend(self._denoise())
        except Exception as exc:  # fail the batch, not the process
            log.exception("denoising step failed; failing %d rows", len(self.rows))
            for row in list(self.rows):
                events.append(ErrorEvent(row.req.request_id, "engine_error", f"denoising step failed: {exc}"))
                self._release(row)
        self.steps_run += 1
        return events

    # -------------------------------------------------------- admission, exit
    def _drop_cancelled(self, events: list[EngineEvent]) -> None:
        if not self.cancelled:
            return
        for req in [p for p in self.pending if p.request_id in self.cancelled]:
            self.pending.remove(req)
            events.append(ErrorEvent(req.request_id, "cancelled", "request cancelled"))
        for row in [r for r in self.rows if r.req.request_id in self.cancelled]:
            events.append(ErrorEvent(row.req.request_id, "cancelled", "request cancelled"))
            self._release(row)
        self.cancelled.clear()

    def _admit(self, events: list[EngineEvent]) -> None:
        admitted: list[tuple[_Row, list[int]]] = []
        while self.pending and len(self.rows) < self.config.max_batch:
            req = self.pending.pop(0)
            needed = len(req.prompt_ids) + self._canvases_for(req) * self.canvas_length
            if not req.prompt_ids or needed > self.config.max_context:
                events.append(ErrorEvent(
                    req.request_id, "too_long",
                    f"prompt ({len(req.prompt_ids)} tokens) + max_new_tokens rounded up to whole canvases "
                    f"({needed} tokens) exceeds max_context {self.config.max_context}",
                ))
                continue
            generator = torch.Generator(device=self.device)
            generator.manual_seed(req.params.seed)
            row = _Row(
                req=req, slot=len(self.rows), generator=generator,
                canvas=torch.empty(0), prev_draft=torch.empty(0), soft=None, fixed=None, fixed_ids=None,
            )
            if req.template:
                row.fixed, row.fixed_ids = self._template_tensors(req.template)
            self.rows.append(row)
            admitted.append((row, req.prompt_ids))
        self._encode(admitted, events, "prompt")

    def _encode_committed(self, events: list[EngineEvent]) -> None:
        committed = [(r, r.needs_encode) for r in self.rows if r.needs_encode is not None]
        for row, _ in committed:
            row.needs_encode = None
        self._encode(committed, events, "canvas")  # type: ignore[arg-type]

    def _release(self, row: _Row) -> None:
        """Remove a row, keeping active slots contiguous (the last row moves into the hole)."""
        slot = row.slot
        last = self.rows[-1]
        self.rows.pop()
        if last is not row:
            self.pool.move(last.slot, slot)
            last.slot = slot
            self.rows[slot] = last
        self.pool.release(len(self.rows))

    def _canvases_for(self, req: EngineRequest) -> int:
        return math.ceil(req.params.max_new_tokens / self.canvas_length)

    def _template_tensors(self, template: dict[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        fixed = torch.zeros(self.canvas_length, dtype=torch.bool)
        ids = torch.zeros(self.canvas_length, dtype=torch.long)
        for pos, tok in template.items():
            fixed[pos] = True
            ids[pos] = tok
        return fixed.to(self.device), ids.to(self.device)

    # ---------------------------------------------------------------- encoder
    def _encode(self, batch: list[tuple[_Row, list[int]]], events: list[EngineEvent], what: str) -> None:
        """One batched encoder pass over new tokens of several rows, then a fresh canvas for each.

        A failure fails these rows only (the batch goes on).
        """
        if not batch:
            return
        try:
            if what == "canvas" and self.static_encodes:  # L tokens per row: the fixed-shape (captured) pass
                self._static_encoder_forward([r.slot for r, _ in batch], [ids for _, ids in batch])
            else:
                self._encoder_forward([r.slot for r, _ in batch], [ids for _, ids in batch])
                self.forwards[(f"{what}_encode", "eager")] += 1
        except Exception as exc:
            log.exception("%s encoding failed for %d rows", what, len(batch))
            for row, _ in batch:
                events.append(ErrorEvent(row.req.request_id, "engine_error", f"{what} encoding failed: {exc}"))
                self._release(row)
            return
        for row, _ in batch:
            self._new_canvas(row)

    def _encoder_forward(self, slots: list[int], ids: list[list[int]]) -> None:
        """Run the encoder over `ids[i]` after what slot `slots[i]` holds; the pool keeps the new keys."""
        enc = self.model.model.encoder.language_model
        batch = EncoderBatch(self.pool, slots, [len(x) for x in ids])
        input_ids = torch.full((len(ids), batch.width), self.text_config.pad_token_id or 0, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        input_ids = input_ids.to(self.device)
        positions = batch.positions()
        hidden = enc.embed_tokens(input_ids)
        rope = {t: enc.rotary_emb(hidden, positions, t) for t in enc.unique_layer_types}
        masks = {t: self._as_attention_mask(m) for t, m in batch.masks.items()}
        for i, layer in enumerate(enc.layers[: self.text_config.num_hidden_layers]):
            kind = self.text_config.layer_types[i]
            hidden = layer(hidden, position_embeddings=rope[kind], attention_mask=masks[kind],
                           position_ids=positions, cache=batch)
        batch.commit()

    def _static_encoder_forward(self, slots: list[int], ids: list[list[int]]) -> None:
        """`_encoder_forward` for committed canvases, through the smallest encode bucket that holds them."""
        n, L, dev = len(slots), self.canvas_length, self.device
        bucket = min(b for b in self.static_encodes if b >= n)
        step = self.static_encodes[bucket]
        pad = self.text_config.pad_token_id or 0
        totals = [self.pool.total[s] for s in slots]
        row_ids = torch.full((bucket, L), pad, dtype=torch.long)
        row_ids[:n] = torch.tensor(ids, dtype=torch.long)
        row_slots = torch.full((bucket,), self.pool.spare_slot, dtype=torch.long)
        row_slots[:n] = torch.tensor(slots, dtype=torch.long)
        total = torch.zeros(bucket, dtype=torch.long)
        total[:n] = torch.tensor(totals, dtype=torch.long)
        step.ids.copy_(row_ids)
        step.slots.copy_(row_slots)
        step.positions.copy_(total[:, None] + torch.arange(L))
        step.scatter.copy_(step.positions)
        window = self.pool.window
        j = torch.arange(L, device=dev)  # the masks are large: built on the device that uses them
        for kind, mask in step.masks.items():
            cap = mask.shape[-1] - L
            held = torch.zeros(bucket, dtype=torch.long)
            held[:n] = torch.tensor([self.pool.held_kind(s, kind) for s in slots], dtype=torch.long)
            held = held.to(dev)
            t = torch.arange(cap, device=dev)
            past_ok = t[None, None, :] < held[:, None, None]  # (bucket, 1, cap): what each slot holds
            new_ok = (j[None, :] <= j[:, None])[None]  # (1, L, L): causal over the new tokens
            if kind == "sliding_attention":
                past_ok = past_ok & ((j[None, :, None] + held[:, None, None] - t[None, None, :]) < window)
                new_ok = new_ok & ((j[:, None] - j[None, :]) < window)[None]
                keep = torch.clamp(held + L, max=window - 1)
                src = (held + L - keep)[:, None] + t[None, :]  # index into past + new, for each kept position
                step.gather.copy_(torch.where(src < held[:, None], src, cap + src - held[:, None]).clamp(
                    max=cap + L - 1))
            self._set_mask(mask, torch.cat([past_ok.expand(bucket, L, cap), new_ok.expand(bucket, L, L)], dim=-1))
        step.run(self._static_encode_forward)
        self.forwards[("canvas_encode", "graph" if step.graph is not None else "static")] += 1
        for slot, past in zip(slots, totals, strict=True):
            self.pool.total[slot] = past + L

    def _static_encode_forward(self, step: StaticEncode) -> None:
        enc = self.model.model.encoder.language_model
        hidden = enc.embed_tokens(step.ids)
        rope = {t: enc.rotary_emb(hidden, step.positions, t) for t in enc.unique_layer_types}
        cache = StaticEncoderCache(self.pool, step)
        for i, layer in enumerate(enc.layers[: self.text_config.num_hidden_layers]):
            kind = self.text_config.layer_types[i]
            hidden = layer(hidden, position_embeddings=rope[kind], attention_mask=step.masks[kind],
                           position_ids=step.positions, cache=cache)

    def _set_mask(self, buffer: torch.Tensor, allowed: torch.Tensor) -> None:
        """Write a (bucket, L, keys) bool mask (True: attend) into a static (bucket, 1, L, keys) mask buffer."""
        buffer.copy_(self._as_attention_mask(allowed[:, None]))

    def _as_attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Boolean (True: attend) for sdpa and flex; additive for eager attention."""
        if self._eager:
            return torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill(
                ~mask, torch.finfo(self.dtype).min)
        return mask

    def _new_canvas(self, row: _Row) -> None:
        L = self.canvas_length
        canvas = torch.randint(0, self.vocab_size, (1, L), generator=row.generator, device=self.device)[0]
        if row.fixed is not None and row.canvas_index == 0:
            canvas = sampler.clamp_template(canvas, row.fixed, row.fixed_ids)
        row.canvas = canvas
        row.prev_draft = torch.full((L,), -1, dtype=torch.long, device=self.device)
        row.soft = None
        row.run = 0
        row.step_in_canvas = 0

    # ---------------------------------------------------------------- decoder
    def _decoder_layers(self, canvas: torch.Tensor, soft: torch.Tensor, positions: torch.Tensor,
                        masks: dict[str, torch.Tensor | None], cache: DecoderCacheView) -> torch.Tensor:
        """The decoder over a canvas. canvas (B, L), soft (B, L, H), positions (B, L) -> hidden (B, L, H)."""
        dec = self.model.model.decoder
        hidden = dec.self_conditioning(dec.embed_tokens(canvas), soft)
        rope = {t: dec.rotary_emb(hidden, positions, t) for t in dec.unique_layer_types}
        for i, layer in enumerate(dec.layers[: self.text_config.num_hidden_layers]):
            kind = self.text_config.layer_types[i]
            hidden = layer(hidden, position_embeddings=rope[kind], attention_mask=masks[kind],
                           position_ids=positions, cache=cache)
        return dec.norm(hidden)

    def _positions(self) -> torch.Tensor:
        totals = torch.tensor([self.pool.total[r.slot] for r in self.rows], device=self.device)
        return totals[:, None] + torch.arange(self.canvas_length, device=self.device)[None, :]  # (B, L)

    def _decoder_hidden(self, canvas: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """One batched decoder forward. canvas (B, L), soft (B, L, H) -> hidden (B, L, H)."""
        n, L = canvas.shape
        if self.static_steps:
            return self._static_decoder_hidden(canvas, soft)
        cache, key_masks = self.pool.decoder_view(n)
        masks = {t: self._attention_mask(m, n, L) for t, m in key_masks.items()}
        self.forwards[("decoder", "eager")] += 1
        return self._decoder_layers(canvas, soft, self._positions(), masks, cache)

    # ------------------------------------------------------- static / graphs
    def _build_static_steps(self, capture: bool) -> None:
        from tqdm.auto import tqdm

        widths = {t: self.pool.capacity(t) for t in set(self.pool.layer_types)}
        mask_dtype = self.dtype if self._eager else torch.bool
        buckets = buckets_for(self.config.max_batch)
        mempool = torch.cuda.graph_pool_handle() if capture else None
        bar = tqdm(sorted(buckets, reverse=True), desc="capturing decoder steps and canvas encodes" if capture
                   else "static steps", unit="bucket", disable=not capture)
        L = self.canvas_length
        with self._no_autograd():
            for bucket in bar:  # largest first, so smaller ones reuse its memory pool
                step = StaticStep(bucket, L, self.text_config.hidden_size, widths, self.device, self.dtype,
                                  mask_dtype)
                encode = StaticEncode(bucket, L, widths, self.pool.spare_slot, self.device, mask_dtype)
                for m in [*step.masks.values(), *encode.masks.values()]:  # valid masks for warm-up and capture
                    m[..., -L:] = True if mask_dtype == torch.bool else 0.0
                if capture:
                    try:  # the encode's warm-up writes into the spare slot only
                        seconds = step.capture(self._static_forward, mempool)
                        seconds += encode.capture(self._static_encode_forward, mempool)
                    except Exception:  # serve without graphs rather than not at all
                        log.exception("CUDA graph capture failed at bucket %d; decoding eagerly instead", bucket)
                        self.static_steps.clear()
                        self.static_encodes.clear()
                        self.decode_mode = "eager"
                        return
                    bar.set_postfix(bucket=bucket, seconds=f"{seconds:.1f}")
                self.static_steps[bucket] = step
                self.static_encodes[bucket] = encode

    def _static_forward(self, step: StaticStep) -> torch.Tensor:
        cache = DecoderCacheView([_LayerView(k[: step.bucket], v[: step.bucket])
                                  for k, v in zip(self.pool.keys, self.pool.values, strict=True)])
        masks: dict[str, torch.Tensor | None] = dict(step.masks)
        return self._decoder_layers(step.canvas, step.soft, step.positions, masks, cache)

    def _static_decoder_hidden(self, canvas: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        n, L = canvas.shape
        bucket = min(b for b in self.static_steps if b >= n)
        step = self.static_steps[bucket]
        step.canvas[:n].copy_(canvas)
        step.soft[:n].copy_(soft)
        step.positions[:n].copy_(self._positions())
        for kind, mask in step.masks.items():
            width = mask.shape[-1] - L
            held = torch.tensor([self.pool.held_kind(r.slot, kind) for r in self.rows], device=self.device)
            keys = torch.arange(width, device=self.device)[None, :] < held[:, None]  # (n, width)
            full = torch.zeros((bucket, width), dtype=torch.bool, device=self.device)
            full[:n] = keys
            allowed = torch.cat([full, torch.ones((bucket, L), dtype=torch.bool, device=self.device)], dim=-1)
            self._set_mask(mask, allowed[:, None, :].expand(bucket, L, width + L))
        self.forwards[("decoder", "graph" if step.graph is not None else "static")] += 1
        return step.run(self._static_forward)[:n]

    def _attention_mask(self, key_mask: torch.Tensor | None, n: int, L: int) -> torch.Tensor | None:
        """(B, 1, 1, kv) cache mask -> (B, 1, L, kv + L) with the canvas always visible."""
        if key_mask is None:
            return None
        canvas = torch.ones((n, 1, 1, L), dtype=torch.bool, device=self.device)
        return self._as_attention_mask(torch.cat([key_mask, canvas], dim=-1).expand(n, 1, L, key_mask.shape[-1] + L))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Soft-capped float32 logits, computed in place after the head. (b, L, H) -> (b, L, V)."""
        cap = self.model.final_logit_softcapping
        logits = self.model.lm_head(hidden).float()
        if cap is not None:
            logits.div_(cap).tanh_().mul_(cap)
        return logits

    def _soft_embedding(self, scaled_logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The next step's self-conditioning signal, as the reference decoder computes it from its logits."""
        embed = self.model.model.decoder.embed_tokens
        if self.dtype == torch.float32:
            weights = probs  # softmax of the same float32 logits: identical
        else:
            weights = torch.softmax(scaled_logits.to(self.dtype), dim=-1, dtype=torch.float32).to(self.dtype)
        return torch.matmul(weights, embed.weight) * embed.embed_scale.to(self.dtype)

    def _sample_exact(self, hidden: torch.Tensor, temp: torch.Tensor, generators: list[torch.Generator]):
        """The reference's ops: float32 logits, softmax, multinomial. -> sampled, draft, entropy, soft."""
        return self._sample_torch(hidden, temp, generators, sampler.sample_rows)

    def _sample_fast(self, hidden: torch.Tensor, temp: torch.Tensor, generators: list[torch.Generator]):
        """As `_sample_exact`, drawing by inverse CDF instead of torch.multinomial."""
        return self._sample_torch(hidden, temp, generators, sampler.sample_rows_inverse_cdf)

    def _sample_torch(self, hidden: torch.Tensor, temp: torch.Tensor, generators: list[torch.Generator], draw):
        logits = self._logits(hidden)  # (b, L, V) float32
        logits.div_(temp[:, None, None])
        probs = torch.softmax(logits, dim=-1)
        sampled = draw(probs, generators)
        draft = logits.argmax(dim=-1)
        soft = self._soft_embedding(logits, probs)
        entropy = sampler.token_entropy_(logits, probs)  # last: makes logits log-probabilities
        return sampled, draft, entropy, soft

    def _sample_fused(self, hidden: torch.Tensor, temp: torch.Tensor, generators: list[torch.Generator]):
        """Two Triton passes over the model-dtype head output; no float32 vocabulary tensor."""
        from worker import fused

        logits = self.model.lm_head(hidden).contiguous()  # (b, L, V) model dtype
        inv_temp = (1.0 / temp).float().contiguous()
        seeds = torch.cat([torch.randint(0, 2**62, (1,), generator=g, device=self.device) for g in generators])
        cap = self.model.final_logit_softcapping
        stats = fused.fused_stats(logits, inv_temp, seeds, cap, self.dtype)
        probs = fused.fused_probs(logits, inv_temp, stats, cap, self.dtype)
        del logits
        embed = self.model.model.decoder.embed_tokens
        soft = torch.matmul(probs, embed.weight) * embed.embed_scale.to(self.dtype)
        return stats["sample"], stats["argmax"], stats["entropy"], soft

    def _denoise(self) -> list[EngineEvent]:
        rows = self.rows
        n, L = len(rows), self.canvas_length
        hidden_size = self.text_config.hidden_size
        canvas = torch.stack([r.canvas for r in rows])  # (B, L)
        soft = torch.stack([
            r.soft if r.soft is not None else torch.zeros((L, hidden_size), dtype=self.dtype, device=self.device)
            for r in rows
        ])  # (B, L, H)
        timer = _Timer(self.device) if self.profile is not None else None
        hidden = self._decoder_hidden(canvas, soft)
        if timer:
            timer.lap("decoder_ms")

        params = [r.req.params for r in rows]
        f32 = dict(dtype=torch.float32, device=self.device)
        steps_done = torch.tensor([r.step_in_canvas for r in rows], device=self.device)
        num_steps = torch.tensor([p.max_denoising_steps for p in params], device=self.device)
        temp = sampler.temperature(steps_done, num_steps, torch.tensor([p.t_min for p in params], **f32),
                                   torch.tensor([p.t_max for p in params], **f32))
        generators = [r.generator for r in rows]

        sampled = torch.empty((n, L), dtype=torch.long, device=self.device)
        draft = torch.empty((n, L), dtype=torch.long, device=self.device)
        entropy = torch.empty((n, L), dtype=torch.float32, device=self.device)
        next_soft = torch.empty((n, L, hidden_size), dtype=self.dtype, device=self.device)
        chunk = max(1, self.config.sample_chunk_rows)
        sample_chunk = {"fused": self._sample_fused, "exact": self._sample_exact,
                        "fast": self._sample_fast}[self.sampler_mode]
        for a in range(0, n, chunk):  # at most `chunk` rows of full-vocabulary logits alive at once
            b = min(n, a + chunk)
            sampled[a:b], draft[a:b], entropy[a:b], next_soft[a:b] = sample_chunk(
                hidden[a:b], temp[a:b], generators[a:b])

        if timer:
            timer.lap("sampler_ms")
        fixed, fixed_ids = self._batch_template(rows)
        if fixed is not None:
            draft = sampler.clamp_template(draft, fixed, fixed_ids)
            sampled = sampler.clamp_template(sampled, fixed, fixed_ids)
            entropy = entropy.masked_fill(fixed, 0.0)
        bound = torch.tensor([p.entropy_bound for p in params], **f32)
        accepted = sampler.entropy_bound_accept(entropy, bound)
        if fixed is not None:
            accepted |= fixed
        new_canvas = sampler.renoise(torch.where(accepted, sampled, canvas), accepted, self.vocab_size, generators)
        if fixed is not None:
            new_canvas = sampler.clamp_template(new_canvas, fixed, fixed_ids)
        free = (~fixed).float() if fixed is not None else torch.ones_like(entropy)
        mean_entropy = (entropy * free).sum(-1) / free.sum(-1).clamp_min(1.0)
        run = sampler.stable_run(draft, torch.stack([r.prev_draft for r in rows]),
                                 torch.tensor([r.run for r in rows], device=self.device))
        stop = sampler.should_stop(
            run, mean_entropy,
            torch.tensor([p.stability_threshold for p in params], device=self.device),
            torch.tensor([p.confidence_threshold for p in params], **f32),
        )

        # what the events need, to the host
        draft_cpu = draft.cpu().tolist()
        mask_cpu = accepted.cpu().tolist()
        token_entropy_cpu = entropy.cpu().tolist()
        entropy_cpu = mean_entropy.cpu().tolist()
        run_cpu = run.cpu().tolist()
        stop_cpu = stop.cpu().tolist()

        if timer and self.profile is not None:
            timer.lap("accept_ms")
            self.profile.append({**timer.laps, "rows": n})
        events: list[EngineEvent] = []
        finished: list[_Row] = []
        for i, row in enumerate(rows):
            row.step_in_canvas += 1
            row.total_steps += 1
            row.run = run_cpu[i]
            row.canvas = new_canvas[i]
            row.prev_draft = draft[i]
            row.soft = next_soft[i]
            events.append(StepEvent(row.req.request_id, row.canvas_index, row.step_in_canvas, draft_cpu[i],
                                    sum(mask_cpu[i]), float(entropy_cpu[i]), mask_cpu[i], token_entropy_cpu[i]))
            if stop_cpu[i] or row.step_in_canvas >= row.req.params.max_denoising_steps:
                if self._commit(row, draft_cpu[i], events):
                    finished.append(row)
        for row in finished:
            self._release(row)
        return events

    def _batch_template(self, rows: Iterable[_Row]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        rows = list(rows)
        if all(r.fixed is None or r.canvas_index > 0 for r in rows):
            return None, None
        L = self.canvas_length
        fixed = torch.stack([
            r.fixed if r.fixed is not None and r.canvas_index == 0
            else torch.zeros(L, dtype=torch.bool, device=self.device) for r in rows])
        ids = torch.stack([
            r.fixed_ids if r.fixed_ids is not None and r.canvas_index == 0
            else torch.zeros(L, dtype=torch.long, device=self.device) for r in rows])
        return fixed, ids

    def _commit(self, row: _Row, draft: list[int], events: list[EngineEvent]) -> bool:
        """Commit the draft as the row's next canvas. Returns True when the request is finished."""
        params = row.req.params
        eos = set(params.eos_token_ids)
        cut = next((j for j, t in enumerate(draft) if t in eos), None)
        budget = params.max_new_tokens - len(row.tokens)
        kept = draft[: cut if cut is not None else len(draft)][:budget]
        row.tokens.extend(kept)
        events.append(CanvasEvent(row.req.request_id, row.canvas_index, kept, row.step_in_canvas))
        row.canvas_index += 1
        if cut is not None and cut <= budget:
            reason = "stop"
        elif len(row.tokens) >= params.max_new_tokens:
            reason = "length"
        else:
            row.needs_encode = draft  # the reference encodes the whole argmax canvas
            return False
        events.append(DoneEvent(row.req.request_id, list(row.tokens), reason, len(row.req.prompt_ids),
                                row.canvas_index, row.total_steps))
        return True
