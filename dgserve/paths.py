"""Where the repository's models live."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def models_dir() -> Path:
    return Path(os.environ.get("DG_MODELS_DIR", REPO_ROOT / "models"))
