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
from pydantic import BaseModel

from protocol import contract
from worker.hooks import RunnerHooks
from worker.types import CanvasEvent

P = "dgserve:"
log = logging.getLogger("dgserve.requests")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
TPF_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)


class WorkerMetrics(RunnerHooks):
    """The worker's Prometheus metrics and its request-end log line, fed by the runner's hooks (no state per
    request: what a hook is given is all it needs)."""

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

    # ------------------------------------------------------------ the runner's hooks
    def admitted(self, job: contract.Job) -> None:
        m = self.model
        self.queue_time.labels(m).observe(max(0.0, time.time() - job.created_at))
        self.prompt_tokens.labels(m).inc(len(job.prompt_ids))

    def committed(self, canvas: CanvasEvent) -> None:
        self.canvas_latency.labels(self.model).observe(canvas.seconds)

    def published(self, event: BaseModel, job: contract.Job) -> None:
        m, since_created = self.model, time.time() - job.created_at
        kind = event.type  # type: ignore[attr-defined]
        if kind == "step":
            self.denoising_steps.labels(m).inc()
            if event.canvas == 0 and event.step == 1:  # type: ignore[attr-defined]  (the first of this attempt)
                self.first_step.labels(m).observe(since_created)
        elif kind in contract.FINAL_TYPES:
            self.e2e.labels(m).observe(since_created)
            self._ended(event, since_created)  # type: ignore[arg-type]

    def _ended(self, event: contract.Done | contract.Error, e2e_s: float) -> None:
        m = self.model
        fields = {"request_id": event.request_id, "model": m,
                  "outcome": event.type if event.type == "done" else event.code, "e2e_s": round(e2e_s, 4)}
        if event.type == "done":
            fields |= {"finish_reason": event.finish_reason, **event.usage.model_dump()}
            self.success.labels(m, event.finish_reason).inc()
            self.generation_tokens.labels(m).inc(event.usage.completion_tokens)
            self.tokens_per_forward.labels(m).observe(event.usage.tokens_per_forward)
        else:
            self.failure.labels(m, event.code).inc()
        log.info("request end %s", " ".join(f"{k}={v}" for k, v in fields.items()), extra={"fields": fields})

    def stepped(self, seconds: float, rows: int, running: int, pending: int) -> None:
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
