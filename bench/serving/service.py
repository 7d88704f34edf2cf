"""The service mode: the full service (Redis + gateway + one worker, real processes, started here) or a running
one (`--url`), driven by WebSocket clients; with the worker's own metrics and CPU use per process and thread."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.serving.clients import run_clients
from bench.serving.procstat import CpuWatch, metric, run_info, scrape, thread_name
from bench.serving.report import engine_steps
from bench.serving.workload import Record, Req
from protocol import contract


def redis_costs(redis_url: str, sample_event: str, rounds: int = 200) -> dict:
    """The gateway's per-event Redis work (an XREAD that finds one event), against the live Redis."""
    import redis

    r = redis.Redis.from_url(redis_url)
    key = "bench:events:xread"
    r.xadd(key, {contract.EVENT_FIELD: sample_event})
    t = time.perf_counter()
    for _ in range(rounds):
        r.xread({key: "0-0"}, count=512)
    xread = (time.perf_counter() - t) / rounds
    r.delete(key)
    r.close()
    return {"gateway_xread_ms_per_call": round(xread * 1e3, 4)}


class ServiceMode:
    """The full service: started here (Redis + gateway + one worker, real processes) or at `--url`."""

    name = "service"

    def __init__(self, args, model_name: str, checkpoint: str):
        self.args, self.svc = args, None
        self.compression = None if args.ws_compression == "none" else "deflate"
        if args.url:
            self.base = args.url.rstrip("/")
            self.ws_url = self.base.replace("http://", "ws://").replace("https://", "wss://") + "/ws/generate"
            self.model = args.model
            print(f"service: using {self.base}", flush=True)
        else:
            from tests.procs import Service

            log_dir = Path(tempfile.mkdtemp(prefix="dg-bench-serve-"))
            print(f"service: starting redis + gateway + 1 {args.device} worker (max_batch {args.max_batch}, "
                  f"{args.torch_threads} torch threads); logs in {log_dir}", flush=True)
            started = time.perf_counter()
            self.svc = svc = Service({model_name: Path(checkpoint)}, log_dir)
            try:
                svc.start_gateway()
                svc.start_worker(model_name, max_batch=args.max_batch, max_context=args.max_context,
                                 torch_threads=args.torch_threads, device=args.device, log_level="WARNING")
                svc.wait_ready(timeout=240)
            except BaseException:
                svc.close()
                raise
            print(f"service: ready in {time.perf_counter() - started:.1f}s", flush=True)
            self.base, self.ws_url, self.model = svc.url, svc.ws_url, model_name
        self.worker_metrics = (f"http://127.0.0.1:{self.svc.workers[0].metrics_port}/metrics"  # type: ignore
                               if self.svc else None)
        self.cpu: dict[str, float] = {}
        self.threads: dict[int, float] = {}
        self.watched_s = 0.0
        self.worker = Counter()
        self.last_run_info: dict = {}

    def warm(self, reqs: list[Req]) -> None:
        t = time.perf_counter()
        recs, _ = asyncio.run(run_clients(self.ws_url, reqs, self.model, self.args.timeout, self.compression,
                                          "warm-up", quiet=True))
        bad = [r.error for r in recs if r.error]
        print(f"service: warm-up, {len(recs)} requests, {time.perf_counter() - t:.2f}s"
              f"{' ERRORS ' + str(bad) if bad else ''}", flush=True)

    def run(self, reqs: list[Req], label: str) -> tuple[list[Record], float]:
        before = scrape(self.worker_metrics) if self.worker_metrics else {}
        watch = None
        if self.svc:
            watch = CpuWatch({"worker": self.svc.workers[0].proc.pid, "gateway": self.svc.gateway.proc.pid,
                              "redis": self.svc.redis.proc.pid, "client (this process)": os.getpid()})
        records, wall = asyncio.run(run_clients(self.ws_url, reqs, self.model, self.args.timeout, self.compression,
                                                label, on_start=watch.start if watch else None))
        self.last_run_info = {}
        if watch:
            w, cpu, threads = watch.stop()
            if cpu.get("_engine_thread_run"):
                self.last_run_info = run_info(w, cpu["_engine_thread_run"], cpu["_engine_thread_runq"])
            self.watched_s += w
            for k, v in cpu.items():
                self.cpu[k] = self.cpu.get(k, 0.0) + v
            for k, v in threads.items():
                self.threads[k] = self.threads.get(k, 0.0) + v
        if self.worker_metrics:
            after = scrape(self.worker_metrics)
            for k in ("time_per_denoising_step_seconds_sum", "time_per_denoising_step_seconds_count",
                      "batch_size_sum"):
                self.worker[k] += metric(after, "dgserve:" + k) - metric(before, "dgserve:" + k)
        return records, wall

    def extra(self, wall_s: float, records: list[Record]) -> dict:
        out: dict = {"url": self.base, "ws_compression": self.args.ws_compression}
        sched = {k: self.cpu.pop(k) for k in [k for k in self.cpu if k.startswith("_")]}
        if self.cpu:
            cores = os.cpu_count() or 1
            total = sum(self.cpu.values())
            out["cpu"] = {"wall_s": round(self.watched_s, 3), "cores": cores,
                          "cpu_s": {k: round(v, 3) for k, v in self.cpu.items()},
                          "cpu_s_total": round(total, 3),
                          "utilisation_of_all_cores": round(total / (self.watched_s * cores), 3)}
            main = self.svc.workers[0].proc.pid  # type: ignore[union-attr]
            others = sorted(((round(v, 3), thread_name(main, tid)) for tid, v in self.threads.items()
                             if tid != main and v > 0.0005), reverse=True)
            out["cpu"]["worker_threads_cpu_s"] = {
                "main (engine loop, torch thread 0)": round(self.threads.get(main, 0.0), 3),
                "others, busiest first (torch threads, publisher, fetcher, ...)": [list(x) for x in others[:8]]}
        n = self.worker["time_per_denoising_step_seconds_count"]
        if n:
            busy, run = self.worker["time_per_denoising_step_seconds_sum"], sched.get("_engine_thread_run")
            main_cpu = (self.threads.get(self.svc.workers[0].proc.pid, 0.0)  # type: ignore[union-attr]
                        if self.threads else None)
            out["worker"] = engine_steps(int(n), self.worker["batch_size_sum"] / n, busy, wall_s, main_cpu,
                                         (self.watched_s, run, sched["_engine_thread_runq"]) if run else None)
        if self.svc and self.args.breakdown:
            sample = next((r for r in records if r.error is None), None)
            width = sample.completion_tokens // max(sample.canvases, 1) if sample else 32
            ev = json.dumps({"type": "step", "request_id": "0" * 32, "canvas": 0, "step": 1,
                             "draft_ids": list(range(100, 100 + width)), "draft_text": "x" * (4 * width),
                             "accepted": 3, "mean_entropy": 1.0})
            out["redis_costs"] = redis_costs(self.svc.redis.url, ev)
        return out

    def close(self) -> None:
        if self.svc:
            self.svc.close()
