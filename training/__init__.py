"""Training of the small DiffusionGemma checkpoints dgserve ships (sudoku solver, tiny English model).

    python -m training sudoku --out models/sudoku --max-seconds 150 --device cuda
    python -m training text   --out models/text   --max-seconds 150 --device cuda --corpus build/corpus.jsonl.gz
    python -m training corpus --out build/corpus.jsonl.gz
    python -m training sudoku-bank                              # the unique-solution puzzle bank (gcc, qqwing)
    python -m training gpu    --out /tmp/m --budget 420 --init-from models --text-canvas 256   # the GPU call

`training.cli.main(argv) -> int` is the entry point (to be wired as `dgserve train ...`).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from training.cli import main as _main

    return _main(argv)


__all__ = ["main"]
