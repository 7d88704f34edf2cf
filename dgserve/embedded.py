"""`dgserve up`: the whole service on one machine, supervised.

Starts Redis (unless REDIS_URL is set), the gateway and one CPU worker per model as child processes,
waits until the gateway reports every model ready, prints where it listens, restarts a worker that
dies, and stops everything on Ctrl-C (SIGINT) or SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dgserve.paths import REPO_ROOT, models_dir
from dgserve.process import terminate
from dgserve.redis_server import RedisServer, free_port

EMBEDDED_MODELS = ("text", "sudoku")


def default_models() -> str:
    base = models_dir()
    found = [f"{name}={base / name}" for name in EMBEDDED_MODELS if (base / name / "config.json").exists()]
    if found:
        return ",".join(found)
    random_dir = base / "tiny-random"
    if not (random_dir / "config.json").exists():
        print(f"no trained checkpoints under {base}; building an untrained one at {random_dir}", flush=True)
        from worker.checkpoints import build_random_checkpoint

        build_random_checkpoint(random_dir)
    return f"random={random_dir}"


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    restarts: int = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, env=self.env)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout)


def _ready(url: str, models: list[str]) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        body = json.loads(err.read() or b"{}")
    except OSError as err:
        return False, f"gateway not answering ({err.__class__.__name__})"
    missing = [m for m in models if m not in body.get("models", [])]
    if body.get("ready") and not missing:
        return True, "ready"
    return False, body.get("reason") or f"waiting for workers: {', '.join(missing)}"


def run_embedded(host: str = "127.0.0.1", port: int = 8000, models: str | None = None,
                 workers_per_model: int = 1) -> int:
    models = models or os.environ.get("DG_MODELS") or default_models()
    names = [item.split("=", 1)[0] for item in models.split(",")]
    redis_server = None
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        redis_server = RedisServer(data_dir=REPO_ROOT / ".cache" / "redis").start()
        redis_url = redis_server.url
        print(f"redis: started {redis_server.binary} on {redis_url} (AOF in {redis_server.data_dir})", flush=True)
    else:
        print(f"redis: using REDIS_URL={redis_url}", flush=True)

    env = {**os.environ, "REDIS_URL": redis_url, "DG_MODELS": models, "PYTHONUNBUFFERED": "1"}
    # leave a core to the gateway and Redis; spinning OpenMP threads would take it back
    threads = max(1, ((os.cpu_count() or 2) - 1) // max(1, len(names) * workers_per_model))
    children = [Child("gateway", [sys.executable, "-m", "dgserve", "gateway", "--host", host, "--port", str(port)],
                      env)]
    for item in models.split(","):
        name, path = item.split("=", 1)
        for i in range(workers_per_model):
            wenv = {**env, "DG_MODEL_NAME": name, "DG_MODEL_PATH": str(Path(path)), "DG_DEVICE": "cpu",
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                    "DG_MAX_BATCH": os.environ.get("DG_MAX_BATCH", "16"),
                    "DG_TORCH_THREADS": str(threads), "DG_METRICS_PORT": str(free_port()),
                    "DG_WORKER_ID": f"{name}-{i}-{os.getpid()}"}
            children.append(Child(f"worker[{name}#{i}]", [sys.executable, "-m", "dgserve", "worker"], wenv))

    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for child in children:
        child.start()

    url = f"http://{host}:{port}"
    started, last_reason, announced = time.monotonic(), "", False
    try:
        while not stopping:
            for child in children:
                if not child.alive() and not stopping:
                    code = child.proc.returncode if child.proc else None
                    child.restarts += 1
                    print(f"{child.name} exited ({code}); restart #{child.restarts}", flush=True)
                    if child.restarts > 5:
                        print("too many restarts; stopping", flush=True)
                        stopping = True
                        break
                    child.start()
            if not announced:
                ok, reason = _ready(url, names)
                if ok:
                    announced = True
                    print(f"\ndgserve is up in {time.monotonic() - started:.0f}s, listening on {url}\n"
                          f"  models:    {', '.join(names)}\n"
                          f"  POST       {url}/generate\n"
                          f"  WebSocket  ws://{host}:{port}/ws/generate\n"
                          f"  OpenAI     {url}/v1\n"
                          f"  docs       {url}/docs\n"
                          f"Ctrl-C stops everything.\n", flush=True)
                elif reason != last_reason:
                    print(f"starting: {reason}", flush=True)
                    last_reason = reason
            time.sleep(0.5)
    finally:
        print("stopping...", flush=True)
        for child in children:
            child.stop()
        if redis_server is not None:
            redis_server.stop()
        print("stopped.", flush=True)
    return 0
