"""Operators' view: every metric named in the docs appears and moves when a request runs (parsed with
prometheus_client's parser), /readyz is the gateway's and /readyz/workers the workers', a taken metrics port is
one line, one log line per request end; and `dgserve up` as a terminal user runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dgserve.redis_server import DataDirInUse, RedisServer, free_port
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


def test_gateway_is_ready_without_workers_and_requests_wait_for_one(tiny_checkpoint, tmp_path):
    """/readyz is the gateway's own readiness (it can queue: Redis answers); worker presence is its own field and
    /readyz/workers. A model scaled to zero keeps the API in its load balancer and requests wait in Redis."""
    svc = Service({"tiny": tiny_checkpoint}, tmp_path, gateway_env={"DG_LOG_JSON": "true"})
    try:
        svc.start_gateway()
        svc.wait_gateway()
        r = httpx.get(svc.url + "/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["ready"] and r.json()["workers"] == 0 and r.json()["missing_models"] == ["tiny"]
        w = httpx.get(svc.url + "/readyz/workers")
        assert w.status_code == 503 and w.json()["reason"] == "no live worker for tiny"
        assert httpx.get(svc.url + "/readyz/workers?model=nope").status_code == 404
        with httpx.Client(base_url=svc.url, timeout=120) as client, ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(client.post, "/generate", json={"prompt": "wait for me", "max_new_tokens": 16,
                                                                  "max_denoising_steps": 3, "seed": 1})
            time.sleep(1.0)
            assert not waiting.done()  # queued in Redis, no worker yet
            worker = svc.start_worker("tiny")
            svc.wait_ready()
            assert waiting.result().status_code == 200
        assert httpx.get(svc.url + "/readyz").json()["models"] == ["tiny"]
        worker.signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 20
        while httpx.get(svc.url + "/readyz/workers").status_code != 503:
            assert time.monotonic() < deadline, "workers still reported after the worker stopped"
            time.sleep(0.2)
        assert httpx.get(svc.url + "/readyz").status_code == 200  # the gateway still queues
        svc.start_worker("tiny")
        svc.wait_ready()  # workers are back
        lines = [json.loads(line) for line in svc.gateway.log().splitlines() if line.startswith("{")]
        assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)  # JSON logs
        svc.redis.stop()
        r = httpx.get(svc.url + "/readyz", timeout=10)
        assert r.status_code == 503 and r.json()["reason"] == "redis unreachable"
    finally:
        svc.close()


def test_a_taken_worker_metrics_port_is_one_clear_line(tiny_checkpoint, tmp_path):
    with socket.socket() as taken, Service({"tiny": tiny_checkpoint}, tmp_path) as svc:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = svc.start_worker("tiny", metrics_host="127.0.0.1", metrics_port=str(port))
        assert worker.proc.wait(timeout=120) == 2
        log = worker.log()
        assert f"dgserve worker: cannot serve worker metrics on 127.0.0.1:{port}: Address already in use" in log
        assert "Traceback" not in log


# ----------------------------------------------------------------------------- dgserve up, as in a terminal
class Up:
    """`dgserve up` in a process group of its own, as a shell runs a foreground job: a Ctrl-C in the terminal is
    SIGINT to that whole group (os.killpg)."""

    def __init__(self, tmp: Path, port: int, data_dir: Path, models: str):
        self.tmp, self.port, self.data_dir = tmp, port, data_dir
        self.out = tmp / f"up-{port}-{data_dir.name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dgserve", "up", "--port", str(port), "--data-dir", str(data_dir), "--models",
             models], stdout=open(self.out, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
            env={k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DG_MODELS")} | {
                "PYTHONUNBUFFERED": "1", "DG_MAX_BATCH": "4"})

    def log(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.proc.poll() is None, f"dgserve up exited ({self.proc.returncode}):\n{self.log()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} from dgserve up:\n{self.log()[-3000:]}"
            time.sleep(0.2)

    def ctrl_c(self) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout=90)

    def kill(self) -> None:
        """Stop it as a user would (Ctrl-C), or kill it: its children die with it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on `port`."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(address)
    return found


@pytest.fixture(scope="module")
def up(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("up")
    running = Up(tmp, free_port(), tmp / "redis", f"tiny={tiny_checkpoint}")
    try:
        running.wait_for("dgserve is up")
        yield running
    finally:
        running.kill()


def test_up_prints_every_address_and_worker_metrics_stay_on_the_gateway_host(up):
    log = up.log()
    assert f"listening on http://127.0.0.1:{up.port}" in log
    metrics = re.findall(r"metrics +http://127\.0\.0\.1:(\d+)/metrics +\(worker\[tiny#0\]\)", log)
    assert len(metrics) == 1, log
    port = int(metrics[0])
    assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1 only, as the gateway
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert "dgserve:num_requests_running" in body
    # no page that needs a CDN (Swagger UI, ReDoc) is served or advertised; the schema is
    assert "/docs" not in log
    gateway = f"http://127.0.0.1:{up.port}"
    assert httpx.get(gateway + "/docs").status_code == httpx.get(gateway + "/redoc").status_code == 404
    assert httpx.get(gateway + "/openapi.json").json()["info"]["title"] == "dgserve"


def test_a_second_up_on_a_taken_port_starts_nothing(up):
    other = up.tmp / "other-redis"
    second = Up(up.tmp, up.port, other, "tiny=/nonexistent")
    try:
        assert second.proc.wait(timeout=60) == 2
    finally:
        second.kill()
    log = second.log()
    assert log.strip() == f"dgserve up: port {up.port} on 127.0.0.1 is already in use (another `dgserve up`?); " \
                          "stop it, or choose another with --port", log
    assert not other.exists() or not any(other.iterdir())  # no Redis was started
    assert httpx.get(f"http://127.0.0.1:{up.port}/readyz", timeout=10).status_code == 200  # the first one is fine


def test_one_data_directory_never_has_two_redis_servers(up):
    second = Up(up.tmp, free_port(), up.data_dir, "tiny=/nonexistent")
    try:
        assert second.proc.wait(timeout=60) == 2
    finally:
        second.kill()
    log = second.log()
    assert log.startswith(f"dgserve up: the Redis data directory {up.data_dir} is in use by another server (pid "), log
    assert len(log.strip().splitlines()) == 1 and "redis: started" not in log
    with pytest.raises(DataDirInUse):
        RedisServer(data_dir=up.data_dir).start()
    with RedisServer(data_dir=up.tmp / "free"):  # another directory is fine, and is locked while it runs
        with pytest.raises(DataDirInUse):
            RedisServer(data_dir=up.tmp / "free").start()
    with RedisServer(data_dir=up.tmp / "free"):  # released when the first one stopped
        pass


def test_ctrl_c_stops_everything_in_order_without_a_traceback(up):
    assert up.ctrl_c() == 0
    log = up.log()
    after = log[log.index("Ctrl-C stops everything."):]
    assert "stopping..." in after and after.strip().splitlines()[-1] == "stopped.", after
    for noise in ("Traceback", "KeyboardInterrupt", "redis unreachable", "WARNING", "ERROR"):
        assert noise not in after, after
    assert not listening_addresses(up.port)
    RedisServer(data_dir=up.data_dir).start().stop()  # its Redis is gone: the directory is free again


def test_ctrl_c_on_a_lone_gateway_is_quiet(tiny_checkpoint, tmp_path):
    with RedisServer() as redis_server:
        port = free_port()
        out = tmp_path / "gateway.log"
        env = {**os.environ, "REDIS_URL": redis_server.url, "DG_MODELS": f"tiny={tiny_checkpoint}"}
        proc = subprocess.Popen([sys.executable, "-m", "dgserve", "gateway", "--port", str(port)],
                                stdout=open(out, "wb"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            deadline = time.monotonic() + 60
            while "Application startup complete" not in out.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
                time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(timeout=30) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
        assert "Traceback" not in out.read_text() and "KeyboardInterrupt" not in out.read_text(), out.read_text()


def test_a_killed_up_leaves_nothing_behind(tiny_checkpoint, tmp_path):
    """Its children run in sessions of their own (for Ctrl-C); they still end with it, even on SIGKILL."""
    running = Up(tmp_path, free_port(), tmp_path / "redis", f"tiny={tiny_checkpoint}")
    try:
        running.wait_for("dgserve is up")
        running.proc.kill()  # the supervisor alone, as the OOM killer would
        running.proc.wait()
        deadline = time.monotonic() + 60
        while listening_addresses(running.port):
            assert time.monotonic() < deadline, "the gateway outlived dgserve up"
            time.sleep(0.2)
        while True:  # Redis too: its data directory is free again
            try:
                RedisServer(data_dir=running.data_dir).start().stop()
                break
            except DataDirInUse:
                assert time.monotonic() < deadline, "Redis outlived dgserve up"
                time.sleep(0.2)
    finally:
        running.kill()
