"""What the processes of a run cost: CPU seconds per process and per worker thread (/proc), and the worker's
Prometheus samples."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value} (samples only)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def metric(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.split("{")[0] == prefix)


class CpuWatch:
    """CPU seconds of processes (and of the worker's threads) between `start` and `stop`."""

    def __init__(self, pids: dict[str, int]):
        import psutil

        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    def _read(self) -> tuple[dict[str, float], dict[int, float]]:
        cpu = {}
        for name, p in self.procs.items():
            t = p.cpu_times()
            cpu[name] = t.user + t.system
        threads = {}
        if "worker" in self.procs:
            threads = {t.id: t.user_time + t.system_time for t in self.procs["worker"].threads()}
            pid = self.procs["worker"].pid
            cpu["_engine_thread_run"], cpu["_engine_thread_runq"] = schedstat(pid, pid)
        return cpu, threads

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0, self.threads0 = self._read()

    def stop(self) -> tuple[float, dict[str, float], dict[int, float]]:
        """-> wall seconds, CPU seconds per process, CPU seconds per worker thread id."""
        wall = time.perf_counter() - self.t0
        cpu1, threads1 = self._read()
        return (wall, {k: cpu1[k] - self.cpu0.get(k, 0.0) for k in cpu1},
                {tid: t - self.threads0.get(tid, 0.0) for tid, t in threads1.items()})


def schedstat(pid: int, tid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a core) of one thread, from /proc (0s if absent)."""
    try:
        run_ns, wait_ns, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        return int(run_ns) / 1e9, int(wait_ns) / 1e9
    except (OSError, ValueError):
        return 0.0, 0.0


def run_info(wall: float, run: float, runq: float) -> dict:
    """How much of one run the engine loop's thread spent waiting for a core (high: the machine was busy)."""
    return {"engine_thread_on_cpu_share": round(run / wall, 3), "engine_thread_waiting_for_a_core_share":
            round(runq / wall, 3)}


def thread_time_split(wall: float, run: float, runq: float) -> dict:
    """A thread's wall time: on a CPU, runnable but waiting for a core, and the rest (sleeping: waiting for
    the GIL, a lock, I/O or work)."""
    return {"wall_s": round(wall, 3), "on_cpu_s": round(run, 3), "waiting_for_a_core_s": round(runq, 3),
            "sleeping_s": round(max(0.0, wall - run - runq), 3)}


def thread_name(pid: int, tid: int) -> str:
    try:
        return f"{Path(f'/proc/{pid}/task/{tid}/comm').read_text().strip()}#{tid}"
    except OSError:
        return f"#{tid}"
