"""Worker metrics (Prometheus), named after vLLM's with our prefix, and the worker's HTTP endpoints.

`/metrics`, `/healthz` (process alive), `/readyz` (model loaded and Redis reachable) on one small
threaded HTTP server, off the engine's thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from protocol import contract

P = "dgserve:"
log = logging.getLogger("dgserve.requests")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
TPF_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)


class WorkerMetrics:
    def __init__(self, model: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self.model = model
        self.running = Gauge(P + "num_requests_running", "Requests in the batch", labels, registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests admitted but not yet in the batch", labels,
                             registry=r)
        self.batch_size = Histogram(P + "batch_size", "Rows per batched denoising step", labels, registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.success = Counter(P + "request_success", "Requests finished", labels + ["finished_reason"],
                               registry=r)
        self.failure = Counter(P + "request_failure", "Requests failed", labels + ["reason"], registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated", labels, registry=r)
        self.denoising_steps = Counter(P + "denoising_steps", "Denoising steps run (per request row)", labels,
                                       registry=r)
        self.queue_time = Histogram(P + "request_queue_time_seconds", "Time from accept to admission", labels,
                                    registry=r, buckets=LATENCY_BUCKETS)
        self.first_step = Histogram(P + "time_to_first_step_seconds", "Time from accept to the first step event",
                                    labels, registry=r, buckets=LATENCY_BUCKETS)
        self.step_time = Histogram(P + "time_per_denoising_step_seconds", "Wall time of one batched step", labels,
                                   registry=r, buckets=STEP_BUCKETS)
        self.canvas_latency = Histogram(P + "canvas_latency_seconds", "Time to denoise and commit one canvas",
                                        labels, registry=r, buckets=LATENCY_BUCKETS)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Time from accept to the final event", labels,
                             registry=r, buckets=LATENCY_BUCKETS)
        self.forwards = Counter(P + "engine_forwards", "Batched forward passes, by pass (decoder, canvas_encode, "
                                "prompt_encode) and how they ran (graph: CUDA-graph replay; static: fixed shapes run "
                                "eagerly; eager)", labels + ["pass", "path"], registry=r)
        self._forwards_seen: dict[tuple[str, str], int] = {}
        self.engine = None
        self.tokens_per_forward = Histogram(P + "tokens_per_forward", "Generated tokens per denoising step",
                                            labels, registry=r, buckets=TPF_BUCKETS)
        self._first_seen: dict[str, float] = {}
        self._canvas_start: dict[str, float] = {}
        self._created: dict[str, float] = {}

    def observer(self) -> Callable[[str, object], None]:
        m = self.model

        def observe(kind: str, payload: object) -> None:
            now = time.time()
            if kind == "admitted":
                job: contract.Job = payload  # type: ignore[assignment]
                self._created[job.request_id] = job.created_at
                self._canvas_start[job.request_id] = now
                self.queue_time.labels(m).observe(max(0.0, now - job.created_at))
                self.prompt_tokens.labels(m).inc(len(job.prompt_ids))
            elif kind == "failed":
                self.failure.labels(m, str(payload)).inc()
            elif kind == "event":
                self._event(payload, now)

        return observe

    def _event(self, ev, now: float) -> None:
        m, rid = self.model, ev.request_id
        if ev.type == "step":
            self.denoising_steps.labels(m).inc()
            if rid not in self._first_seen and rid in self._created:
                self._first_seen[rid] = now
                self.first_step.labels(m).observe(now - self._created[rid])
        elif ev.type == "canvas":
            start = self._canvas_start.get(rid, now)
            self.canvas_latency.labels(m).observe(now - start)
            self._canvas_start[rid] = now
        elif ev.type in contract.FINAL_TYPES:
            created = self._created.pop(rid, None)
            first = self._first_seen.pop(rid, None)
            self._canvas_start.pop(rid, None)
            if created is not None:
                self.e2e.labels(m).observe(now - created)
            fields = {"request_id": rid, "model": m, "outcome": ev.type if ev.type == "done" else ev.code,
                      "e2e_s": round(now - created, 4) if created else None,
                      "first_step_s": round(first - created, 4) if first and created else None}
            if ev.type == "done":
                fields |= {"finish_reason": ev.finish_reason, **ev.usage.model_dump()}
            log.info("request end %s", " ".join(f"{k}={v}" for k, v in fields.items()), extra={"fields": fields})
            if ev.type == "done":
                self.success.labels(m, ev.finish_reason).inc()
                self.generation_tokens.labels(m).inc(ev.usage.completion_tokens)
                self.tokens_per_forward.labels(m).observe(ev.usage.tokens_per_forward)
            else:
                self.failure.labels(m, ev.code).inc()

    def step(self, seconds: float, rows: int, running: int, pending: int) -> None:
        """After a batched step of `rows` rows: `running` rows remain, `pending` wait to join."""
        m = self.model
        self.step_time.labels(m).observe(seconds)
        self.batch_size.labels(m).observe(rows)
        self.running.labels(m).set(running)
        self.waiting.labels(m).set(pending)
        if self.engine is not None:  # called on the engine's thread, between steps
            for (kind, path), count in self.engine.forwards.items():
                delta = count - self._forwards_seen.get((kind, path), 0)
                if delta:
                    self.forwards.labels(m, kind, path).inc(delta)
                    self._forwards_seen[(kind, path)] = count


class MetricsServerError(OSError):
    """The worker's metrics/health server cannot listen where it was told to (a one-line reason)."""


def serve_http(host: str, port: int, registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]]):
    """Start /metrics, /healthz, /readyz in a daemon thread. Returns the server (port 0: a free port)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path.startswith("/metrics"):
                body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
            elif self.path.startswith("/healthz"):
                body, ctype, code = b'{"status":"ok"}', "application/json", 200
            elif self.path.startswith("/readyz"):
                ok, reason = ready()
                body = json.dumps({"ready": ok, "reason": reason}).encode()
                ctype, code = "application/json", 200 if ok else 503
            else:
                body, ctype, code = b'{"detail":"not found"}', "application/json", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # keep probes out of the logs
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise MetricsServerError(f"cannot serve worker metrics on {host}:{port}: {exc.strerror or exc}; set "
                                 "DG_METRICS_PORT to a free port (0: no metrics server)") from None
    threading.Thread(target=server.serve_forever, name="worker-http", daemon=True).start()
    return server
