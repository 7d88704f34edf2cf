"""A running service for the service benchmarks: an existing one (`--url`), or `dgserve up` started here."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ready(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
            body = json.loads(resp.read())
            return body if body.get("ready") else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


@contextlib.contextmanager
def service(url: str | None, models: list[str], timeout: float = 300) -> Iterator[str]:
    """Yield the base URL of a service whose workers serve `models`."""
    if url:
        yield url.rstrip("/")
        return
    sys.path.insert(0, str(ROOT))
    from dgserve.redis_server import free_port

    port = free_port()
    log = open(ROOT / "bench" / "results" / "logs" / f"service-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dgserve", "up", "--port", str(port)], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = _ready(base)
            if body and all(m in body.get("models", []) for m in models):
                break
            if proc.poll() is not None:
                raise RuntimeError(f"dgserve up exited ({proc.returncode}); see {log.name}")
            time.sleep(0.5)
        else:
            raise TimeoutError(f"service not ready in {timeout}s; see {log.name}")
        print(f"started dgserve up on {base}", flush=True)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        Path(log.name).unlink(missing_ok=True)
