"""The Sudoku training bank: puzzles with exactly one solution, generated ahead, rated, packed small, committed.

    python -m training sudoku-bank --puzzles 48000 --out training/data/sudoku_bank.npz    # needs gcc and qqwing

Generation: `sudoku_gen.c` (built here with gcc, loaded with ctypes) draws a random solved grid and blanks its
cells in a random order, keeping a blank only while the puzzle still has exactly one solution (a bitmask
backtracking solver that counts solutions up to 2): qqwing's own method, so the puzzles are minimal and have
qqwing's ~55-60 blanks. qqwing (`--solve --stats --count-solutions`) then rates each puzzle (simple, easy,
intermediate, expert: the techniques its solver needed) and counts its solutions a second time, independently;
a puzzle it does not count as unique is dropped (none has been).

Packing: digits relabelled so that the first row reads 123456789 (training draws a random relabelling anyway),
solutions 4 bits a cell, givens 1 bit a cell, one difficulty byte: ~53 bytes a puzzle before compression.
The GPU machine needs neither gcc nor qqwing: it loads the .npz.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).resolve().parent / "sudoku_gen.c"
BANK_PATH = Path(__file__).resolve().parent / "data" / "sudoku_bank.npz"
DIFFICULTIES = ("simple", "easy", "intermediate", "expert")  # qqwing's, in order: the bank's codes 0..3


# --------------------------------------------------------------------------------------- the C generator

def build_library(cache_dir: Path | None = None) -> Path:
    """Compile sudoku_gen.c into a shared library (cached by the source's hash)."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise FileNotFoundError("no C compiler (apt-get install gcc): needed only to generate a new bank")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    cache_dir = cache_dir or Path(tempfile.gettempdir()) / "dgserve-sudoku-gen"
    cache_dir.mkdir(parents=True, exist_ok=True)
    lib = cache_dir / f"sudoku_gen_{digest}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{time.time_ns()}.tmp")
        subprocess.run([gcc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)], check=True)
        tmp.replace(lib)
    return lib


@functools.cache  # once per process: not a hash of the source and a dlopen per call
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build_library()))
    lib.sg_count.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.sg_count.restype = ctypes.c_int
    lib.sg_generate.argtypes = [ctypes.c_uint64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.sg_generate.restype = None
    return lib


def count_solutions(puzzle: np.ndarray, limit: int = 2) -> int:
    """Solutions of one puzzle (81 digits, 0 = blank), counted up to `limit` (the C solver)."""
    grid = np.ascontiguousarray(puzzle, dtype=np.uint8).reshape(81)
    return int(_library().sg_count(grid.ctypes.data, limit))


def generate(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` minimal unique puzzles and their solutions, (n, 81) uint8 each, deterministic in `seed`."""
    puzzles = np.zeros((n, 81), dtype=np.uint8)
    solutions = np.zeros((n, 81), dtype=np.uint8)
    _library().sg_generate(seed, n, puzzles.ctypes.data, solutions.ctypes.data)
    return puzzles, solutions


def _generate_chunk(args: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return generate(*args)


# ---------------------------------------------------------------------------------------------- qqwing

def qqwing_rate(puzzles: np.ndarray, qqwing: str = "qqwing") -> tuple[list[str], list[int]]:
    """(difficulty, solution count) of each puzzle by qqwing's own solver and rater."""
    exe = shutil.which(qqwing)
    if exe is None:
        raise FileNotFoundError("qqwing is not installed (apt-get install qqwing)")
    lines = ["".join("." if d == 0 else str(d) for d in p) for p in puzzles.tolist()]
    out = subprocess.run([exe, "--solve", "--csv", "--stats", "--count-solutions", "--nosolution"],
                         input="\n".join(lines) + "\n", capture_output=True, text=True, check=True).stdout
    rows = [r.split(",") for r in out.splitlines()[1:] if r.strip()]
    if len(rows) != len(lines):
        raise RuntimeError(f"qqwing rated {len(rows)} of {len(lines)} puzzles")
    return [r[-2].strip().lower() for r in rows], [int(r[0]) for r in rows]


# ----------------------------------------------------------------------------------------------- packing

def canonical_labels(puzzles: np.ndarray, solutions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel the digits of each pair so that the solution's first row reads 1..9."""
    relabel = np.zeros((len(solutions), 10), dtype=np.uint8)
    rows = np.arange(len(solutions))[:, None]
    relabel[rows, solutions[:, :9]] = np.arange(1, 10, dtype=np.uint8)[None]
    return np.take_along_axis(relabel, puzzles, 1), np.take_along_axis(relabel, solutions, 1)


def pack(path: Path, puzzles: np.ndarray, solutions: np.ndarray, difficulty: np.ndarray, meta: dict) -> None:
    puzzles, solutions = canonical_labels(puzzles, solutions)
    padded = np.concatenate([solutions, np.zeros((len(solutions), 1), np.uint8)], axis=1)  # 82 cells
    nibbles = (padded[:, 0::2] << 4) | padded[:, 1::2]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, solution=nibbles, givens=np.packbits(puzzles != 0, axis=1),
                        difficulty=difficulty.astype(np.uint8), meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))


@dataclass
class Bank:
    solutions: np.ndarray  # (N, 81) uint8 digits 1..9
    givens: np.ndarray  # (N, 81) bool
    difficulty: np.ndarray  # (N,) uint8: index into DIFFICULTIES
    meta: dict

    def __len__(self) -> int:
        return len(self.solutions)

    @property
    def puzzles(self) -> np.ndarray:
        return np.where(self.givens, self.solutions, 0).astype(np.uint8)

    def spread(self) -> dict[str, float]:
        counts = np.bincount(self.difficulty, minlength=len(DIFFICULTIES))
        return {d: round(float(c) / max(1, len(self)), 4) for d, c in zip(DIFFICULTIES, counts, strict=True)}


def load_bank(path: str | Path = BANK_PATH) -> Bank:
    with np.load(path) as z:
        nibbles, givens, difficulty, meta = z["solution"], z["givens"], z["difficulty"], z["meta"]
    cells = np.stack([nibbles >> 4, nibbles & 15], axis=2).reshape(len(nibbles), -1)[:, :81]
    return Bank(cells.astype(np.uint8), np.unpackbits(givens, axis=1)[:, :81].astype(bool), difficulty,
                json.loads(meta.tobytes().decode()))


def puzzle_keys(puzzles: np.ndarray, solutions: np.ndarray) -> set[bytes]:
    """One key per puzzle, equal for two puzzles that differ only by a relabelling of the digits."""
    canonical, _ = canonical_labels(np.asarray(puzzles, np.uint8), np.asarray(solutions, np.uint8))
    return {row.tobytes() for row in canonical}


def bank_keys(bank: Bank) -> set[bytes]:
    return puzzle_keys(bank.puzzles, bank.solutions)


# ------------------------------------------------------------------------------------------------- build

def build_bank(n: int, out: Path, seed: int = 0, workers: int = 2, chunk: int = 500, log=print) -> dict:
    """Generate `n` puzzles (in `workers` processes), rate and re-count them with qqwing, pack to `out`."""
    if shutil.which("qqwing") is None:  # before minutes of generation, not after
        raise FileNotFoundError("qqwing is not installed (apt-get install qqwing): it rates the bank")
    build_library()
    started = time.time()
    jobs = [(min(chunk, n - a), seed * 1_000_003 + a) for a in range(0, n, chunk)]
    puzzles, solutions = [], []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for k, (p, s) in enumerate(pool.map(_generate_chunk, jobs)):
            puzzles.append(p)
            solutions.append(s)
            if (k + 1) % 10 == 0 or k + 1 == len(jobs):
                log(f"generated {sum(map(len, puzzles))}/{n} in {time.time() - started:.0f}s")
    p, s = np.concatenate(puzzles), np.concatenate(solutions)
    generated_s = time.time() - started
    names, counts = qqwing_rate(p)
    unique = np.array([c == 1 for c in counts])
    keep = unique & np.array([d in DIFFICULTIES for d in names])
    difficulty = np.array([DIFFICULTIES.index(d) if d in DIFFICULTIES else 255 for d in names], dtype=np.uint8)
    meta = {"generator": "training/sudoku_gen.c (random grid, cells blanked in random order while unique)",
            "rater": "qqwing --solve --stats --count-solutions", "seed": seed, "generated": int(n),
            "kept": int(keep.sum()), "not_unique_by_qqwing": int((~unique).sum()),
            "generate_seconds": round(generated_s, 1), "workers": workers,
            "blanks_mean": round(float((p[keep] == 0).sum(1).mean()), 2),
            "blanks_min": int((p[keep] == 0).sum(1).min()), "blanks_max": int((p[keep] == 0).sum(1).max())}
    pack(out, p[keep], s[keep], difficulty[keep], meta)
    bank = load_bank(out)
    meta["spread"] = bank.spread()
    meta["bytes"] = out.stat().st_size
    meta["counts"] = dict(Counter(names))
    return meta
