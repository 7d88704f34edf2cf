"""The engine mode: the service's requests straight into `worker.engine.Engine` in this process, each client's first
request at once and its next when the previous one finished, events timed when `step()` returns them.

With a Redis URL (the diagnostic mode "engine+publisher") the worker's own publisher runs beside the engine loop, as
in the worker process: `worker.publisher.Publisher` converts each step's events (detokenise) and writes them to Redis
for jobs held as a worker holds them; the two halves are timed.
"""

from __future__ import annotations

import json
import os
import queue
import statistics
import threading
import time

from bench.serving.clients import progress_printer
from bench.serving.procstat import run_info, schedstat
from bench.serving.report import DIAGNOSTIC, engine_steps, pct
from bench.serving.workload import Record, Req, engine_params
from protocol import contract


class PublisherBeside:
    """The worker's publisher on a thread of its own, fed with the engine loop's events (`put`), each batch's
    convert and write timed. It holds a job entry per request, taken from its own stream as a worker takes them,
    so that the publish script (which writes only for jobs their worker owns) writes every event."""

    def __init__(self, tokenizer, redis_url: str, served, reqs: list[Req], suffix: str):
        from worker.broker import WorkerBroker
        from worker.hooks import RunnerHooks
        from worker.publisher import Deliveries, Publisher
        from worker.text import Detokenizer

        self.broker = WorkerBroker(redis_url, "bench-publisher", "bench-publisher", lease_ms=600_000)
        self.broker.ensure_group()
        self.deliveries = Deliveries()
        self.publisher = Publisher(self.broker, self.deliveries, Detokenizer(tokenizer), send=lambda message: None,
                                   hooks=RunnerHooks())  # no stop strings here: nothing is sent to the engine
        self._hold([contract.Job(request_id=f"{r.ref}.{suffix}", model="bench-publisher", prompt_ids=r.prompt_ids,
                                 sampling=engine_params(served, r)) for r in reqs])
        self.convert_ms: list[float] = []
        self.write_ms: list[float] = []
        self._queue: queue.Queue[list | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="publisher", daemon=True)
        self._thread.start()

    def _hold(self, jobs: list[contract.Job]) -> None:
        pipe = self.broker.redis.pipeline(transaction=False)
        for job in jobs:
            pipe.xadd(self.broker.stream, {contract.JOB_FIELD: contract.encode(job)})
        pipe.execute()
        for entry_id, fields in self.broker.read_new(len(jobs)):
            self.deliveries.hold(contract.decode_job(fields[contract.JOB_FIELD.encode()]), entry_id)

    def put(self, events: list) -> None:
        self._queue.put(events)

    def _loop(self) -> None:
        while (events := self._queue.get()) is not None:
            started = time.perf_counter()
            batch = self.publisher.convert(events)
            converted = time.perf_counter()
            self.publisher.write(batch)
            self.convert_ms.append((converted - started) * 1e3)
            self.write_ms.append((time.perf_counter() - converted) * 1e3)

    def close(self, timeout: float = 60) -> None:
        self._queue.put(None)
        self._thread.join(timeout=timeout)
        self.broker.redis.close()


class EngineMode:
    """The same requests straight into the engine, in this process (`redis_url`: with the worker's publisher)."""

    def __init__(self, args, served, checkpoint: str, base: EngineMode | None = None, redis_url: str | None = None):
        self.args, self.served, self.redis_url = args, served, redis_url
        self.name = DIAGNOSTIC if redis_url else "engine"
        if base is not None:  # share the loaded model and engine
            self.engine, self.tokenizer = base.engine, base.tokenizer
        else:
            self.engine, self.tokenizer = self._load(args, checkpoint)
        self.step_ms: list[float] = []
        self.rows: list[int] = []
        self.capture: list = []
        self.publisher_tail_s: list[float] = []  # publisher still writing after the engine finished
        self.convert_ms: list[float] = []  # publisher: engine events -> contract events (detokenise), per step
        self.write_ms: list[float] = []  # publisher: the Redis script writing one step's events
        self.counter = 0
        self.thread_cpu_s = 0.0  # CPU time of the engine loop's thread (this one) during the runs
        self.sched = [0.0, 0.0, 0.0]  # wall, on a CPU, waiting for a core: the engine loop's thread in the runs
        self.last_run_info: dict = {}

    @staticmethod
    def _load(args, checkpoint: str):
        """The model and engine as the service's worker is given them (the same DG_* environment and defaults)."""
        import torch

        from worker.engine import Engine
        from worker.loading import load_model
        from worker.settings import WorkerSettings

        print(f"engine: loading {checkpoint} in-process (max_batch {args.max_batch}, {args.torch_threads} "
              "torch threads)", flush=True)
        ws = WorkerSettings(max_batch=args.max_batch, max_context=args.max_context, device=args.device,
                            torch_threads=args.torch_threads)
        torch.set_num_threads(ws.torch_threads)
        model, tokenizer = load_model(checkpoint, ws.device, ws.dtype, ws.quantization)
        return Engine(model, ws.engine_config()), tokenizer

    def warm(self, reqs: list[Req]) -> None:
        t = time.perf_counter()
        self._drive(reqs, "warm-up", quiet=True, record_steps=False)
        print(f"{self.name}: warm-up, {len(reqs)} requests, {time.perf_counter() - t:.2f}s", flush=True)

    def run(self, reqs: list[Req], label: str) -> tuple[list[Record], float]:
        return self._drive(reqs, label)

    def _drive(self, reqs: list[Req], label: str, quiet: bool = False,
               record_steps: bool = True) -> tuple[list[Record], float]:
        """Each client's first request at once, its next one when the previous finished (as the clients do)."""
        from worker.types import EngineRequest

        engine = self.engine
        self.counter += 1
        publisher = (PublisherBeside(self.tokenizer, self.redis_url, self.served, reqs, str(self.counter))
                     if self.redis_url else None)
        queues: dict[int, list[Req]] = {}
        for r in reqs:
            queues.setdefault(r.client, []).append(r)
        open_: dict[str, tuple[Record, float]] = {}
        records: list[Record] = []
        progress = progress_printer(label, len(reqs), quiet)
        tid = threading.get_native_id()
        cpu0, (run0, runq0) = time.thread_time(), schedstat(os.getpid(), tid)
        t0 = time.perf_counter()

        def send(client: int, now: float) -> None:
            if not queues[client]:
                return
            r = queues[client].pop(0)
            rec = Record(r.client, r.index, r.ref, r.seed, sent_s=now - t0, prompt_tokens=len(r.prompt_ids))
            records.append(rec)
            rid = f"{r.ref}.{self.counter}"
            open_[rid] = (rec, now)
            engine.add(EngineRequest(rid, r.prompt_ids, engine_params(self.served, r)))

        for c in list(queues):
            send(c, t0)
        started, n_rows = time.perf_counter(), engine.active + len(engine.pending)
        for events in engine.generate():  # clients send their next request as one ends: generate() sees them
            now = time.perf_counter()
            if publisher is not None and events:
                publisher.put(events)
            if record_steps:
                self.step_ms.append((now - started) * 1e3)
                self.rows.append(min(n_rows, engine.config.max_batch))
            for ev in events:
                rec, sent = open_[ev.request_id]
                if self._record(rec, ev, now - sent):
                    del open_[ev.request_id]
                    progress(rec)
                    send(rec.client, now)
            started, n_rows = time.perf_counter(), engine.active + len(engine.pending)
        wall = time.perf_counter() - t0
        if record_steps:
            self.thread_cpu_s += time.thread_time() - cpu0
            run1, runq1 = schedstat(os.getpid(), tid)
            self.last_run_info = run_info(wall, run1 - run0, runq1 - runq0) if run1 else {}
            self.sched[0] += wall
            self.sched[1] += run1 - run0
            self.sched[2] += runq1 - runq0
        if publisher is not None:
            publisher.close()
            if record_steps:
                self.publisher_tail_s.append(time.perf_counter() - t0 - wall)
                self.convert_ms += publisher.convert_ms
                self.write_ms += publisher.write_ms
        return sorted(records, key=lambda r: (r.client, r.index)), wall

    def _record(self, rec: Record, ev, t: float) -> bool:
        """One engine event into its request's record; True when it is the request's last."""
        from worker.types import CanvasEvent, DoneEvent, ErrorEvent, StepEvent

        if isinstance(ev, StepEvent):
            rec.on_step(t, ev.canvas, ev.step)
            if len(self.capture) < 64:
                self.capture.append(ev)
        elif isinstance(ev, CanvasEvent):
            rec.on_canvas(t)
        elif isinstance(ev, DoneEvent):
            rec.on_done(t, ev.token_ids, len(ev.token_ids), ev.denoising_steps, ev.finish_reason)
        elif isinstance(ev, ErrorEvent):
            rec.on_error(t, ev.code, ev.message)
        return isinstance(ev, DoneEvent | ErrorEvent)

    def extra(self, wall_s: float, records: list[Record]) -> dict:
        e = self.engine
        out: dict = {"device": str(e.device), "decode_mode": e.decode_mode, "sampler": e.sampler_mode}
        if self.redis_url:
            out["diagnostic"] = ("the engine in this process with the worker's real publisher thread beside it "
                                 "(detokenise, encode, XADD to the service's Redis); no gateway, no clients")
            out["publisher_tail_s"] = [round(x, 4) for x in self.publisher_tail_s]
            if self.write_ms:
                out["publisher"] = {"batches": len(self.write_ms),
                                    "convert_ms_mean": round(statistics.fmean(self.convert_ms), 3),
                                    "write_ms_mean": round(statistics.fmean(self.write_ms), 3),
                                    "busy_s": round((sum(self.convert_ms) + sum(self.write_ms)) / 1e3, 3)}
        if self.step_ms:
            out["engine"] = self._engine_summary(wall_s)
        if self.args.breakdown and not self.redis_url:
            out["python_costs"] = python_costs(self.tokenizer, self.capture,
                                               max(1, min(self.args.max_batch, self.args.clients)))
        return out

    def _engine_summary(self, wall_s: float) -> dict:
        out = engine_steps(len(self.step_ms), statistics.fmean(self.rows), sum(self.step_ms) / 1e3, wall_s,
                           self.thread_cpu_s, self.sched if self.sched[1] else None)
        return out | {"step_time_ms_p50": round(pct(self.step_ms, 0.5), 3)}

    def close(self) -> None:
        pass


def python_costs(tokenizer, steps: list, batch: int) -> dict:
    """What the layers above the engine do per step event, timed here, one core, no contention."""
    from worker.text import Detokenizer

    if not steps:
        return {}
    detok = Detokenizer(tokenizer)
    n, m = 2000, len(steps)

    def per_event_us(fn) -> float:
        t = time.perf_counter()
        for i in range(n):
            fn(i % m)
        return round((time.perf_counter() - t) / n * 1e6, 2)

    raws = [contract.encode(detok.step(s)) for s in steps]
    return {
        "worker_decode_draft_us": per_event_us(lambda i: detok.decode(steps[i].draft_ids)),
        "worker_convert_and_encode_us": per_event_us(lambda i: contract.encode(detok.step(steps[i]))),
        "gateway_decode_and_reencode_us": per_event_us(lambda i: contract.decode_event(raws[i]).model_dump_json()),
        "client_json_loads_us": per_event_us(lambda i: json.loads(raws[i])),
        "step_event_bytes": round(statistics.fmean(len(r) for r in raws)),
        "rows_per_step": batch,
    }
