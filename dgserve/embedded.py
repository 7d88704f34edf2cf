"""`dgserve up`: the whole service on one machine, supervised.

Checks that the port is free, then starts Redis (unless REDIS_URL is set; one server per data directory), the
gateway and one CPU worker per model as child processes, waits until every model has a live worker, prints
where everything listens, restarts a child that dies, and stops everything on Ctrl-C, SIGTERM or SIGHUP.

The children run in sessions of their own: a Ctrl-C in the terminal reaches this supervisor only, which stops
them in order (gateway, workers, then Redis), so nothing is cut off mid-way and nothing prints a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dgserve.paths import REPO_ROOT, models_dir
from dgserve.process import die_with_parent, terminate
from dgserve.redis_server import DataDirInUse, RedisServer, free_port

EMBEDDED_MODELS = ("text", "sudoku")
DEFAULT_DATA_DIR = REPO_ROOT / ".cache" / "redis"
MAX_RESTARTS = 5


class CannotStart(Exception):
    """A reason to start nothing, said in one line."""


def default_models() -> str:
    base = models_dir()
    found = [f"{name}={base / name}" for name in EMBEDDED_MODELS if (base / name / "config.json").exists()]
    if found:
        return ",".join(found)
    random_dir = base / "tiny-random"
    if not (random_dir / "config.json").exists():
        print(f"no trained checkpoints under {base}; building an untrained one at {random_dir}", flush=True)
        from training.checkpoints import build_random_checkpoint

        build_random_checkpoint(random_dir)
    return f"random={random_dir}"


def check_port_free(host: str, port: int) -> None:
    """CannotStart when something already listens on host:port (as the gateway would bind it)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CannotStart(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT does not count
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CannotStart(f"port {port} on {host} is already in use (another `dgserve up`?); stop it, "
                                  "or choose another with --port") from None
            raise CannotStart(f"cannot listen on {host}:{port}: {exc.strerror}") from None


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    metrics_url: str | None = None
    proc: subprocess.Popen | None = None
    restarts: int = 0

    def start(self) -> None:
        # a session of its own: the terminal's Ctrl-C goes to the supervisor, which stops the children in order
        self.proc = subprocess.Popen(self.args, env=self.env, start_new_session=True, preexec_fn=die_with_parent)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout)


@dataclass
class Plan:
    """What `dgserve up` runs: the gateway first, then the workers."""

    url: str
    models: list[str]
    children: list[Child] = field(default_factory=list)


def plan_children(host: str, port: int, models: str, workers_per_model: int, redis_url: str) -> Plan:
    names = [item.split("=", 1)[0] for item in models.split(",")]
    env = {**os.environ, "REDIS_URL": redis_url, "DG_MODELS": models, "PYTHONUNBUFFERED": "1"}
    # leave a core to the gateway and Redis; spinning OpenMP threads would take it back
    threads = max(1, ((os.cpu_count() or 2) - 1) // max(1, len(names) * workers_per_model))
    plan = Plan(f"http://{host}:{port}", names)
    plan.children.append(Child("gateway", [sys.executable, "-m", "dgserve", "gateway", "--host", host,
                                           "--port", str(port)], env))
    for item in models.split(","):
        name, path = item.split("=", 1)
        for i in range(workers_per_model):
            metrics_port = free_port()
            wenv = {**env, "DG_MODEL_NAME": name, "DG_MODEL_PATH": str(Path(path)), "DG_DEVICE": "cpu",
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
                    "DG_MAX_BATCH": os.environ.get("DG_MAX_BATCH", "16"),
                    "DG_TORCH_THREADS": os.environ.get("DG_TORCH_THREADS", str(threads)),
                    "DG_METRICS_HOST": host, "DG_METRICS_PORT": str(metrics_port),
                    "DG_WORKER_ID": f"{name}-{i}-{os.getpid()}"}
            plan.children.append(Child(f"worker[{name}#{i}]", [sys.executable, "-m", "dgserve", "worker"], wenv,
                                       metrics_url=f"http://{host}:{metrics_port}/metrics"))
    return plan


def workers_ready(url: str, models: list[str]) -> tuple[bool, str]:
    """Whether every model has a live worker, per the gateway's /readyz/workers, and why not."""
    query = "&".join(f"model={m}" for m in models)
    try:
        with urllib.request.urlopen(f"{url}/readyz/workers?{query}", timeout=2) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        body = json.loads(err.read() or b"{}")
    except OSError as err:
        return False, f"gateway not answering ({err.__class__.__name__})"
    if body.get("ready"):
        return True, "ready"
    return False, body.get("reason") or body.get("detail") or "waiting for workers"


def banner(plan: Plan, started: float) -> str:
    host_port = plan.url.removeprefix("http://")
    workers = [f"  metrics    {c.metrics_url}  ({c.name})" for c in plan.children if c.metrics_url]
    return "\n".join([
        f"\ndgserve is up in {time.monotonic() - started:.0f}s, listening on {plan.url}",
        f"  models     {', '.join(plan.models)}",
        f"  playground {plan.url}/",
        f"  POST       {plan.url}/generate",
        f"  WebSocket  ws://{host_port}/ws/generate",
        f"  OpenAI     {plan.url}/v1  (base_url of the openai client)",
        f"  OpenAPI    {plan.url}/openapi.json  (the API's schema)",
        f"  metrics    {plan.url}/metrics  (gateway)",
        *workers,
        "Ctrl-C stops everything.\n",
    ])


def supervise(plan: Plan, stopping: list[bool]) -> int:
    """Restart children that die, announce readiness once, until asked to stop (0) or a child keeps dying (1)."""
    started, last_reason, announced = time.monotonic(), "", False
    while not stopping:
        for child in plan.children:
            if child.alive() or stopping:
                continue
            code = child.proc.returncode if child.proc else None
            child.restarts += 1
            if child.restarts > MAX_RESTARTS:
                print(f"dgserve up: {child.name} exited ({code}) {MAX_RESTARTS + 1} times; stopping everything",
                      file=sys.stderr, flush=True)
                return 1
            print(f"{child.name} exited ({code}); restart #{child.restarts}", flush=True)
            child.start()
        if not announced and not stopping:
            ok, reason = workers_ready(plan.url, plan.models)
            if ok:
                announced = True
                print(banner(plan, started), flush=True)
            elif reason != last_reason:
                print(f"starting: {reason}", flush=True)
                last_reason = reason
        time.sleep(0.5)
    return 0


def start_redis(data_dir: Path) -> tuple[RedisServer | None, str]:
    redis_url = os.environ.get("REDIS_URL")
    if redis_url:
        print(f"redis: using REDIS_URL={redis_url}", flush=True)
        return None, redis_url
    try:
        server = RedisServer(data_dir=data_dir).start()
    except DataDirInUse as exc:
        raise CannotStart(str(exc)) from None
    print(f"redis: started {server.binary} on {server.url} (AOF in {server.data_dir})", flush=True)
    return server, server.url


def run_embedded(host: str = "127.0.0.1", port: int = 8000, models: str | None = None,
                 workers_per_model: int = 1, data_dir: Path = DEFAULT_DATA_DIR) -> int:
    stopping: list[bool] = []

    def on_signal(signum, _frame):
        stopping.append(True)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    redis_server = None
    plan = None
    try:
        check_port_free(host, port)
        models = models or os.environ.get("DG_MODELS") or default_models()
        redis_server, redis_url = start_redis(Path(data_dir))
        plan = plan_children(host, port, models, workers_per_model, redis_url)
        for child in plan.children:
            child.start()
        return supervise(plan, stopping)
    except CannotStart as exc:
        print(f"dgserve up: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if plan is not None or redis_server is not None:
            print("stopping...", flush=True)
        for child in plan.children if plan else []:
            child.stop()
        if redis_server is not None:
            redis_server.stop()
        if plan is not None or redis_server is not None:
            print("stopped.", flush=True)
