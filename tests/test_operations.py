"""Operators' view: every metric named in the docs appears and moves when a request runs (parsed with
prometheus_client's parser), /readyz follows the workers, and one log line per request end."""

from __future__ import annotations

import json
import signal
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import Service

WORKER_METRICS = {
    "dgserve:num_requests_running": "gauge", "dgserve:num_requests_waiting": "gauge",
    "dgserve:batch_size": "histogram", "dgserve:request_success": "counter", "dgserve:request_failure": "counter",
    "dgserve:prompt_tokens": "counter", "dgserve:generation_tokens": "counter",
    "dgserve:denoising_steps": "counter", "dgserve:request_queue_time_seconds": "histogram",
    "dgserve:time_to_first_step_seconds": "histogram", "dgserve:time_per_denoising_step_seconds": "histogram",
    "dgserve:canvas_latency_seconds": "histogram", "dgserve:e2e_request_latency_seconds": "histogram",
    "dgserve:tokens_per_forward": "histogram", "dgserve:engine_forwards": "counter",
}
GATEWAY_METRICS = {
    "dgserve:http_requests": "counter", "dgserve:requests_accepted": "counter",
    "dgserve:gateway_request_finished": "counter", "dgserve:gateway_time_to_first_step_seconds": "histogram",
    "dgserve:gateway_e2e_request_latency_seconds": "histogram", "dgserve:redis_queue_depth": "gauge",
    "dgserve:redis_stream_pending": "gauge", "dgserve:workers_alive": "gauge", "dgserve:redis_up": "gauge",
    "dgserve:websocket_connections": "gauge", "dgserve:requests_rejected": "counter",
}


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str, suffix: str = "") -> float:
    family = fams.get(name)
    if family is None:
        return 0.0
    target = name + suffix
    return sum(s.value for s in family.samples if s.name == target)


def test_metrics_appear_and_move(tiny_checkpoint, tmp_path):
    svc = Service({"tiny": tiny_checkpoint}, tmp_path)
    try:
        worker = svc.up("tiny")
        before_w = families(svc.worker_metrics(worker))
        before_g = families(httpx.get(svc.url + "/metrics").text)
        for name, kind in WORKER_METRICS.items():
            assert name in before_w and before_w[name].type == kind, name
        r = httpx.post(svc.url + "/generate", json={"prompt": "count me", "max_new_tokens": 64,
                                                    "max_denoising_steps": 5, "seed": 1}, timeout=60)
        assert r.status_code == 200
        usage = r.json()["usage"]
        time.sleep(2.5)  # the gateway refreshes its Redis gauges every 2 s
        after_w = families(svc.worker_metrics(worker))
        after_g = families(httpx.get(svc.url + "/metrics").text)

        def moved(b, a, name, suffix):
            return value(a, name, suffix) - value(b, name, suffix)

        assert moved(before_w, after_w, "dgserve:request_success", "_total") == 1
        assert moved(before_w, after_w, "dgserve:prompt_tokens", "_total") == usage["prompt_tokens"]
        assert moved(before_w, after_w, "dgserve:generation_tokens", "_total") == usage["completion_tokens"]
        assert moved(before_w, after_w, "dgserve:denoising_steps", "_total") == usage["denoising_steps"]
        for hist in ("batch_size", "request_queue_time_seconds", "time_to_first_step_seconds",
                     "time_per_denoising_step_seconds", "canvas_latency_seconds", "e2e_request_latency_seconds",
                     "tokens_per_forward"):
            assert moved(before_w, after_w, f"dgserve:{hist}", "_count") >= 1, hist
        assert moved(before_w, after_w, "dgserve:canvas_latency_seconds", "_count") == usage["canvases"]
        # a CPU worker decodes eagerly: one decoder forward per step of this lone request, one prompt encode
        decoder = [s for s in after_w["dgserve:engine_forwards"].samples
                   if s.name.endswith("_total") and s.labels["pass"] == "decoder"]
        assert [s.labels["path"] for s in decoder] == ["eager"]
        assert moved(before_w, after_w, "dgserve:engine_forwards", "_total") >= usage["denoising_steps"] + 1
        for name, kind in GATEWAY_METRICS.items():
            assert name in after_g and after_g[name].type == kind, name
        assert moved(before_g, after_g, "dgserve:requests_accepted", "_total") == 1
        assert moved(before_g, after_g, "dgserve:gateway_e2e_request_latency_seconds", "_count") == 1
        assert value(after_g, "dgserve:workers_alive") == 1 and value(after_g, "dgserve:redis_up") == 1
        # a refused request moves the failure side
        httpx.post(svc.url + "/generate", json={"prompt": "x", "max_denoising_steps": 5000})
        codes = {s.labels["status"] for s in families(httpx.get(svc.url + "/metrics").text)["dgserve:http_requests"]
                 .samples if s.labels["route"] == "/generate"}
        assert {"200", "422"} <= codes
        # one structured line per request end, without the prompt
        log = worker.log()
        ended = [line for line in log.splitlines() if "request end" in line and r.json()["request_id"] in line]
        assert len(ended) == 1 and "count me" not in log
    finally:
        svc.close()


def test_readyz_follows_the_workers(tiny_checkpoint, tmp_path):
    svc = Service({"tiny": tiny_checkpoint}, tmp_path, gateway_env={"DG_LOG_JSON": "true"})
    try:
        svc.start_gateway()
        svc.wait_gateway()
        r = httpx.get(svc.url + "/readyz")
        assert r.status_code == 503 and r.json()["reason"] == "no worker heartbeat"
        assert httpx.get(svc.url + "/healthz").status_code == 200
        worker = svc.start_worker("tiny")
        svc.wait_ready()
        assert httpx.get(svc.url + "/readyz").json()["models"] == ["tiny"]
        worker.signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 20
        while httpx.get(svc.url + "/readyz").status_code != 503:
            assert time.monotonic() < deadline, "still ready after the worker stopped"
            time.sleep(0.2)
        svc.start_worker("tiny")
        svc.wait_ready()  # ready again when a worker returns
        lines = [json.loads(line) for line in svc.gateway.log().splitlines() if line.startswith("{")]
        assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)  # JSON logs
    finally:
        svc.close()
