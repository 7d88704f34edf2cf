"""The engine: step-level continuous batching of DiffusionGemma block diffusion.

`step()` is schedule -> run -> sample -> update:

    scheduler.schedule()   drop cancelled rows, admit waiting requests, collect committed canvases
    runner.encode(...)     encode the admitted prompts and the committed canvases into the KV pool
    runner.decode(...)     ONE batched decoder forward over every active row
    runner.sample(...)     head + sampler kernels; sampler.decide(): accept, renoise, stop
    scheduler.update(...)  per row: its step event, its commit, its end

Rows join and leave between steps; each row follows its own temperature schedule, parameters, canvas count and
random generator. `generate()` iterates steps to completion; everything that drives the engine uses it or `step()`.
No I/O here: the runner around the engine talks to Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from worker import sampler
from worker.model_runner import ModelRunner
from worker.quantize import is_quantized
from worker.scheduler import Decisions, Row, Scheduler
from worker.transfer import to_device, to_host
from worker.types import DoneEvent, EngineEvent, EngineRequest, ErrorEvent

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_batch: int = 8  # rows decoded together (also the KV pool's slot count)
    max_context: int = 2048  # prompt + generated tokens per request
    sample_chunk_rows: int = 4  # rows whose full-vocabulary logits are alive at once
    # passes: "eager" (shapes follow the batch), "static" (fixed bucket shapes, run eagerly: the CPU check of the
    # graph path), "graphs" (fixed shapes captured as CUDA graphs), "auto" ("graphs" on CUDA unless the weights
    # are quantized, "eager" elsewhere)
    decode_mode: str = "auto"
    # sampler: "exact" (transformers' ops and multinomial draws: the reference's tokens for a seed),
    # "fast" (the same ops, inverse-CDF draws: several times faster than multinomial on a CPU),
    # "fused" (one Triton pass over the logits, Gumbel-max draws from the request's seed), "auto"
    # ("fused" on CUDA with Triton, "fast" elsewhere)
    sampler: str = "auto"


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
        self.text_config = model.config.get_text_config(decoder=True)
        self.canvas_length: int = model.config.canvas_length
        self.vocab_size: int = self.text_config.vocab_size
        self.device = next(model.parameters()).device
        self.dtype = model.model.decoder.embed_tokens.weight.dtype
        self.quantized = is_quantized(model)
        self.decode_mode = self._resolve_mode(self.config.decode_mode)
        self.sampler_mode = self._resolve_sampler(self.config.sampler)
        if self.config.max_context < self.canvas_length:
            raise ValueError(f"max_context {self.config.max_context} is shorter than one canvas "
                             f"({self.canvas_length} tokens)")
        with self._no_autograd():
            self.runner = ModelRunner(model, self.config.max_batch, self.config.max_context, self.decode_mode,
                                      self.config.sample_chunk_rows, self.sampler_mode)
        self.decode_mode = self.runner.decode_mode  # "eager" if capture failed
        self.scheduler = Scheduler(self.runner.pool, self.config.max_batch, self.config.max_context,
                                   self.canvas_length, self.vocab_size, self.device)
        self.steps_run = 0
        self.profile: list[dict[str, float]] | None = None  # set to [] to record per-step timings (syncs!)

    def _resolve_mode(self, mode: str) -> str:
        if mode == "auto":
            # quantized weights run the plain-torch ops (torchao tensors): nothing a CUDA graph should capture
            mode = "graphs" if self.device.type == "cuda" and not self.quantized else "eager"
        if mode not in ("eager", "static", "graphs"):
            raise ValueError(f"unknown decode mode {mode!r} (eager, static, graphs, auto)")
        if mode == "graphs" and self.device.type != "cuda":
            raise ValueError("decode_mode 'graphs' needs a CUDA device")
        return mode

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
    def pool(self):
        return self.runner.pool

    @property
    def rows(self) -> list[Row]:
        return self.scheduler.rows

    @property
    def forwards(self):
        """Batched passes by (pass, path), exported as dgserve:engine_forwards."""
        return self.runner.forwards

    @property
    def active(self) -> int:
        return len(self.scheduler.rows)

    @property
    def pending(self) -> list[EngineRequest]:
        """Requests added and not yet admitted."""
        return self.scheduler.pending

    def add(self, request: EngineRequest) -> None:
        """Queue a request; it joins the batch at the next step."""
        self.scheduler.add(request)

    def cancel(self, request_id: str) -> None:
        """Mark a request; it leaves the batch at the next step."""
        self.scheduler.cancel(request_id)

    def finish(self, request_id: str, reason: str, keep_tokens: int) -> None:
        """End a running request as done (e.g. `stop_string`) with its first `keep_tokens` tokens; it leaves the batch
        at the next step with a `DoneEvent`. A request no longer running is left alone."""
        self.scheduler.finish(request_id, reason, keep_tokens)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def generate(self, requests: Iterable[EngineRequest] = (),
                 joins: dict[int, list[EngineRequest]] | None = None) -> Iterator[list[EngineEvent]]:
        """Add `requests`, then step until idle, yielding each step's events; `joins[k]` are added before step k."""
        for request in requests:
            self.add(request)
        joins = dict(joins or {})
        step = 0
        while self.has_work() or joins:
            for request in joins.pop(step, []):
                self.add(request)
            yield self.step()
            step += 1

    def complete(self, requests: Iterable[EngineRequest] = ()) -> dict[str, DoneEvent | ErrorEvent]:
        """Run `requests` (and whatever is queued) to the end: each request's final event, by id."""
        return {e.request_id: e for events in self.generate(requests) for e in events
                if isinstance(e, DoneEvent | ErrorEvent)}

    # -------------------------------------------------------------------- step
    def _no_autograd(self):
        # torchao's quantized tensors keep version counters, which inference-mode tensors lack: no_grad for them
        return torch.no_grad() if self.quantized else torch.inference_mode()

    def step(self) -> list[EngineEvent]:
        with self._no_autograd():
            plan = self.scheduler.schedule()
            events = plan.events
            self._encode(plan.prompts, [r.req.prompt_ids for r in plan.prompts], "prompt", events)
            self._encode(plan.commits, [r.needs_encode for r in plan.commits], "canvas", events)  # type: ignore[misc]
            if self.scheduler.rows:
                try:
                    events.extend(self._denoise(list(self.scheduler.rows)))
                except Exception as exc:  # fail the batch, not the process
                    log.exception("denoising step failed; failing %d rows", len(self.scheduler.rows))
                    self.scheduler.fail(list(self.scheduler.rows), "engine_error", f"denoising step failed: {exc}",
                                        events)
            self.steps_run += 1
            return events

    def _encode(self, rows: list[Row], ids: list[list[int]], what: str, events: list[EngineEvent]) -> None:
        """Encode prompts or committed canvases (one batched pass per block of L tokens), then a fresh canvas for
        each row. A failure fails these rows only (the batch goes on)."""
        if not rows:
            return
        try:
            self.runner.encode([r.slot for r in rows], ids, what)
        except Exception as exc:
            log.exception("%s encoding failed for %d rows", what, len(rows))
            self.scheduler.fail(rows, "engine_error", f"{what} encoding failed: {exc}", events)
            return
        for row in rows:
            self.scheduler.new_canvas(row)

    def _denoise(self, rows: list[Row]) -> list[EngineEvent]:
        n, L = len(rows), self.canvas_length
        dev = self.device
        canvas = torch.stack([r.canvas for r in rows])  # (B, L)
        zeros = torch.zeros((L, self.text_config.hidden_size), dtype=self.dtype, device=dev)
        soft = torch.stack([r.soft if r.soft is not None else zeros for r in rows])  # (B, L, H)
        timer = _Timer(dev) if self.profile is not None else None
        hidden = self.runner.decode(canvas, soft)
        if timer:
            timer.lap("decoder_ms")
        params = [r.req.params for r in rows]
        # per-row parameters in two non-blocking copies (floats, ints): no host sync before the sampler
        floats = to_device([[p.t_min for p in params], [p.t_max for p in params], [p.entropy_bound for p in params],
                            [p.confidence_threshold for p in params]], torch.float32, dev)
        ints = to_device([[r.step_in_canvas for r in rows], [p.max_denoising_steps for p in params],
                          [r.run for r in rows], [p.stability_threshold for p in params]], torch.long, dev)
        temp = sampler.temperature(ints[0], ints[1], floats[0], floats[1])
        generators = [r.generator for r in rows]
        sampled, draft, entropy, next_soft = self.runner.sample(hidden, temp, generators)
        if timer:
            timer.lap("sampler_ms")
        fixed, fixed_ids = self.scheduler.template(rows)
        d = sampler.decide(sampled, draft, entropy, canvas, torch.stack([r.prev_draft for r in rows]), ints[2], fixed,
                           fixed_ids, floats[2], ints[3], floats[3], self.vocab_size, generators)
        host = Decisions(*to_host(d["draft"], d["accepted"], d["entropy"], d["mean_entropy"], d["run"], d["stop"]))
        if timer and self.profile is not None:
            timer.lap("accept_ms")
            self.profile.append({**timer.laps, "rows": n})
        return self.scheduler.update(rows, d["canvas"], d["draft"], next_soft, host)

