"""Real processes for tests: a Redis server, the gateway and workers, started and stopped for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from dgserve.process import terminate
from dgserve.redis_server import RedisServer, free_port


def _get(url: str, timeout: float = 2.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


class Proc:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int | None:
        code = terminate(self.proc, timeout)
        self._log.close()
        return code

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")


class Service:
    """Gateway + workers against a Redis server, each a real process."""

    def __init__(self, models: dict[str, Path], log_dir: Path, redis: RedisServer | None = None,
                 gateway_env: dict[str, str] | None = None):
        self.models = models
        self.log_dir = log_dir
        self.own_redis = redis is None
        self.redis = redis or RedisServer().start()
        self.port = free_port()
        self.base_env = {**os.environ, "REDIS_URL": self.redis.url, "PYTHONUNBUFFERED": "1",
                         "DG_MODELS": ",".join(f"{k}={v}" for k, v in models.items())}
        self.gateway_env = gateway_env or {}
        self.gateway: Proc | None = None
        self.workers: list[Proc] = []
        self._n = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/generate"

    def start_gateway(self) -> Proc:
        env = {**self.base_env, "DG_PORT": str(self.port), **self.gateway_env}
        self.gateway = Proc("gateway", [sys.executable, "-m", "dgserve", "gateway"], env, self.log_dir)
        return self.gateway

    def start_worker(self, model: str, **settings: str) -> Proc:
        self._n += 1
        env = {**self.base_env, "DG_MODEL_NAME": model, "DG_MODEL_PATH": str(self.models[model]),
               "DG_DEVICE": "cpu", "DG_TORCH_THREADS": "1", "DG_METRICS_PORT": str(free_port()),
               "DG_WORKER_ID": f"w{self._n}-{model}", "DG_HEARTBEAT_INTERVAL_S": "1",
               **{f"DG_{k.upper()}": str(v) for k, v in settings.items()}}
        worker = Proc(f"worker{self._n}", [sys.executable, "-m", "dgserve", "worker"], env, self.log_dir)
        worker.metrics_port = int(env["DG_METRICS_PORT"])  # type: ignore[attr-defined]
        self.workers.append(worker)
        return worker

    def up(self, model: str, **settings: str) -> Proc:
        """The gateway and one worker for `model` (worker settings as in `start_worker`), both ready."""
        self.start_gateway()
        worker = self.start_worker(model, **settings)
        self.wait_ready()
        return worker

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_gateway(self, timeout: float = 60.0) -> None:
        """The gateway answers (whatever the workers)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if _get(self.url + "/healthz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("gateway not answering:\n" + (self.gateway.log()[-3000:] if self.gateway else ""))

    def wait_ready(self, timeout: float = 120.0, models: list[str] | None = None) -> None:
        models = models or list(self.models)
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                code, body = _get(self.url + "/readyz/workers?" + "&".join(f"model={m}" for m in models))
                last = body
                if code == 200 and all(m in body.get("models", []) for m in models):
                    return
            except OSError as exc:
                last = repr(exc)
            if self.gateway is not None and not self.gateway.alive():
                raise RuntimeError("gateway died:\n" + self.gateway.log()[-3000:])
            time.sleep(0.2)
        logs = "\n".join(p.log()[-2000:] for p in [self.gateway, *self.workers] if p)
        raise TimeoutError(f"service not ready: {last}\n{logs}")

    def worker_metrics(self, worker: Proc) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5) as resp:  # type: ignore[attr-defined]
            return resp.read().decode()

    def close(self) -> None:
        for proc in [*self.workers, self.gateway]:
            if proc is not None:
                proc.stop(timeout=15)
        if self.own_redis:
            self.redis.close()
