"""Sudoku helpers shared by the client, the terminal and the server: parsing, checking, an example.

A puzzle is 81 characters, row by row, `0` or `.` for a blank; a solution is 81 digits 1..9. No torch,
no numpy: the gateway and the client import this.
"""

from __future__ import annotations

from collections.abc import Sequence

# The puzzle of Wikipedia's "Sudoku" article (unique solution), the default of `dgserve sudoku`.
EXAMPLE_PUZZLE = "530070000600195000098000060800060003400080001700020006060000280000419005000080079"
EXAMPLE_SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"

BLANKS = "0."
DIGITS = "123456789"
_SEPARATORS = " \t\r\n|+-"  # tolerated in a pasted grid: whitespace and box drawing


def normalize_puzzle(puzzle: str) -> str:
    """81 characters with `0` for every blank. Whitespace and `|`, `+`, `-`, `_` of a pasted grid are
    ignored; `.` and `0` are blanks. Raises ValueError naming the problem."""
    if not isinstance(puzzle, str):
        raise ValueError(f"a puzzle is a string of 81 cells, not {type(puzzle).__name__}")
    cells = [ch for ch in puzzle if ch not in _SEPARATORS]
    bad = sorted({ch for ch in cells if ch not in DIGITS and ch not in BLANKS})
    if bad:
        raise ValueError(f"a puzzle holds digits 1-9 and 0 or . for blanks; found {''.join(bad)!r}")
    if len(cells) != 81:
        raise ValueError(f"a puzzle has 81 cells; got {len(cells)}")
    return "".join("0" if ch in BLANKS else ch for ch in cells)


def _digits(grid: str | Sequence[int]) -> list[int] | None:
    if isinstance(grid, str):
        return [int(ch) if ch in DIGITS else 0 for ch in grid]
    try:
        return [int(d) for d in grid]
    except (TypeError, ValueError):
        return None


def is_valid_solution(puzzle: str | Sequence[int], solution: str | Sequence[int]) -> bool:
    """True when `solution` is 81 digits 1..9, every row, column and 3x3 box a permutation of 1..9, and
    every given of `puzzle` (a non-blank cell) unchanged. Strings or sequences of ints (0 = blank)."""
    if isinstance(solution, str) and (len(solution) != 81 or any(ch not in DIGITS for ch in solution)):
        return False
    sol = _digits(solution)
    if sol is None or len(sol) != 81 or any(not 1 <= d <= 9 for d in sol):
        return False
    if isinstance(puzzle, str):
        try:
            puzzle = normalize_puzzle(puzzle)
        except ValueError:
            return False
    given = _digits(puzzle)
    if given is None or len(given) != 81:
        return False
    if any(g != 0 and g != s for g, s in zip(given, sol, strict=True)):
        return False
    full = set(range(1, 10))
    rows = [sol[9 * r: 9 * r + 9] for r in range(9)]
    cols = [sol[c::9] for c in range(9)]
    boxes = [[sol[9 * (br + r) + bc + c] for r in range(3) for c in range(3)]
             for br in (0, 3, 6) for bc in (0, 3, 6)]
    return all(set(unit) == full for unit in (*rows, *cols, *boxes))


def cells(draft: str) -> str:
    """A draft canvas as 81 display cells: a digit 1-9 stays, anything else is `.`."""
    text = draft if len(draft) == 81 else "".join(draft.split())  # tolerate a spaced-out decode
    text = text[:81].ljust(81, ".")
    return "".join(ch if ch in DIGITS else "." for ch in text)


__all__ = ["EXAMPLE_PUZZLE", "EXAMPLE_SOLUTION", "cells", "is_valid_solution", "normalize_puzzle"]
