"""Child processes, the same way everywhere: stopped with a signal, a grace period, then SIGKILL; and, where
they run in a session of their own, ended with their parent."""

from __future__ import annotations

import ctypes
import signal
import subprocess

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _find_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _find_prctl()  # looked up here, not in the forked child (where a loader lock may be held)


def die_with_parent() -> None:
    """For `preexec_fn`: on Linux the child gets SIGTERM when its parent dies, even by SIGKILL, so a child in a
    session of its own is never left behind holding a port or a data directory. Elsewhere: nothing."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def terminate(proc: subprocess.Popen, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int:
    """Send `sig`, wait up to `timeout` seconds, kill if still running. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
