"""Every DG_* environment variable a dgserve process reads, named once.

A DG_* variable outside this list is a typo or a setting that no longer exists: the gateway and the worker refuse to
start with one (their settings classes call `check`), naming it, instead of silently ignoring it. The processes
share one list because they share environments (`dgserve up`, a compose file, a test harness): a worker must not
refuse the gateway's settings. `tests/test_settings.py` keeps the list equal to what the settings classes read.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from pydantic import ValidationError

PREFIX = "DG_"

# both processes (service/settings.py, worker/settings.py); REDIS_URL, read first, has no prefix
SHARED = frozenset({"DG_REDIS_URL", "DG_LOG_JSON", "DG_LOG_LEVEL"})
GATEWAY = SHARED | {
    "DG_HOST", "DG_PORT", "DG_MODELS", "DG_DEFAULT_MODEL", "DG_MAX_PROMPT_TOKENS", "DG_MAX_NEW_TOKENS",
    "DG_MAX_DENOISING_STEPS", "DG_MAX_QUEUE_DEPTH", "DG_REQUEST_TIMEOUT_S", "DG_MAX_REQUEST_STEPS", "DG_MAX_RUNNING_S",
    "DG_MAX_BODY_BYTES", "DG_READ_TIMEOUT_S", "DG_MAX_WS_MESSAGE_BYTES", "DG_MAX_CONNECTIONS_PER_CLIENT",
    "DG_API_KEYS", "DG_CORS_ORIGINS", "DG_RETRY_AFTER_S",
}
WORKER = SHARED | {
    "DG_MODEL_NAME", "DG_MODEL_PATH", "DG_DEVICE", "DG_DTYPE", "DG_QUANTIZATION", "DG_SAMPLER", "DG_MAX_BATCH",
    "DG_MAX_CONTEXT", "DG_SAMPLE_CHUNK_ROWS", "DG_TORCH_THREADS", "DG_METRICS_HOST", "DG_METRICS_PORT",
    "DG_WORKER_ID", "DG_DRAIN_TIMEOUT_S", "DG_HEARTBEAT_INTERVAL_S", "DG_LEASE_MS", "DG_MAX_ATTEMPTS",
}
CLIENT = frozenset({"DG_URL", "DG_API_KEY"})  # `dgserve generate`, `dgserve sudoku`
TOOLS = frozenset({
    "DG_MODELS_DIR",  # dgserve/paths.py: where the embedded checkpoints live
    "DG_HEALTHCHECK_TIMEOUT_S",  # docker/healthcheck.py
})
KNOWN = GATEWAY | WORKER | CLIENT | TOOLS


class UnknownSettingError(ValueError):
    """DG_* variables that no dgserve process reads."""


def unknown(environ: Mapping[str, str]) -> list[str]:
    """The DG_* names in `environ` that no dgserve process reads (settings are read without regard to case)."""
    return sorted(name for name in environ if name.upper().startswith(PREFIX) and name.upper() not in KNOWN)


def check(environ: Mapping[str, str]) -> None:
    """Raise `UnknownSettingError` naming every DG_* variable in `environ` that no dgserve process reads."""
    names = unknown(environ)
    if not names:
        return
    described = []
    for name in names:
        close = difflib.get_close_matches(name.upper(), sorted(KNOWN), n=1)
        described.append(f"{name} (did you mean {close[0]}?)" if close else name)
    one = len(names) == 1
    raise UnknownSettingError(f"{', '.join(described)}: no dgserve process reads {'this' if one else 'these'} "
                              f"setting{'' if one else 's'}; unset or rename {'it' if one else 'them'} (the README's "
                              "Configuration table lists them all)")


def describe(exc: ValidationError) -> list[str]:
    """A settings class's validation errors, one line each, naming the variable (no traceback for a terminal)."""
    lines = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        loc = ".".join(str(part) for part in error["loc"])
        lines.append(f"{PREFIX}{loc.upper()}: {message} (got {error['input']!r})" if loc else message)
    return lines
