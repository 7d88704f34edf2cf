"""Sudoku helpers shared by the client, the terminal and the server: parsing, checking, an example.

A puzzle is 81 characters, row by row, `0` or `.` for a blank; a solution is 81 digits 1..9. No torch,
no numpy: the gateway and the client import this.
"""

from __future__ import annotations

from collections.abc import Sequence

# The puzzle of Wikipedia's "Sudoku" article (unique solution), the default of `dgserve sudoku`.
EXAMPLE_PUZZLE = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"
EXAMPLE_SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"

BLANKS = "0."
DIGITS = "123456789"
_SEPARATORS = " \t\r\n|+-_"  # ignored in a pasted grid: whitespace and box drawing


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


def problems(puzzle: str | Sequence[int], solution: str | Sequence[int], limit: int = 3) -> list[str]:
    """Why `solution` is not a valid solution of `puzzle`, in words (at most `limit` reasons; [] if valid)."""
    sol = _digits(solution if not isinstance(solution, str) else cells(solution)) or []
    if len(sol) != 81:
        return [f"the solution has {len(sol)} cells, not 81"]
    out: list[str] = []
    blank = sum(not 1 <= d <= 9 for d in sol)
    if blank:
        out.append(f"{blank} cell{'s' if blank > 1 else ''} without a digit")
    given = _digits(puzzle if not isinstance(puzzle, str) else normalize_puzzle(puzzle)) or [0] * 81
    changed = [i for i, (g, s) in enumerate(zip(given, sol, strict=True)) if g and 1 <= s <= 9 and g != s]
    if changed:
        out.append(f"{len(changed)} given{'s' if len(changed) > 1 else ''} changed")
    units = ([("row", r + 1, [9 * r + c for c in range(9)]) for r in range(9)]
             + [("column", c + 1, [9 * r + c for r in range(9)]) for c in range(9)]
             + [("box", 3 * (b // 3) + b % 3 + 1, [9 * (3 * (b // 3) + r) + 3 * (b % 3) + c
                                                   for r in range(3) for c in range(3)]) for b in range(9)])
    for kind, n, idx in units:
        values = [sol[i] for i in idx if 1 <= sol[i] <= 9]
        repeats = sorted({v for v in values if values.count(v) > 1})
        if repeats:
            out.append(f"{kind} {n} repeats {', '.join(map(str, repeats))}")
    return out[:limit] if len(out) <= limit else [*out[:limit], f"and {len(out) - limit} more"]


def cells(draft: str) -> str:
    """A draft canvas as 81 display cells: a digit 1-9 stays, anything else is `.`."""
    text = draft if len(draft) == 81 else "".join(draft.split())  # tolerate a spaced-out decode
    text = text[:81].ljust(81, ".")
    return "".join(ch if ch in DIGITS else "." for ch in text)


def canvas_cells(puzzle: str, text: str, token_ids: Sequence[int] | None = None) -> str:
    """The 81 cells a Sudoku canvas holds (a digit 1-9, or `.`), from its text when that has 81 characters;
    otherwise (a decode that dropped special tokens) from its token ids, each digit's id learnt from the
    givens of `puzzle` (normalized, `0` blank), which the template clamps."""
    if len(text) == 81 or not token_ids:
        return cells(text)
    digit_of = {tok: g for g, tok in zip(puzzle, token_ids, strict=False) if g != "0"}
    return "".join(digit_of.get(tok, ".") for tok in token_ids[:81]).ljust(81, ".")


def draft_grid(puzzle: str, text: str, token_ids: Sequence[int] | None = None) -> str:
    """The grid to show for a streamed step: the givens of `puzzle`, the draft's cells elsewhere."""
    draft = canvas_cells(puzzle, text, token_ids)
    return "".join(p if p != "0" else d for p, d in zip(puzzle, draft, strict=True))


__all__ = ["EXAMPLE_PUZZLE", "EXAMPLE_SOLUTION", "canvas_cells", "cells", "draft_grid", "is_valid_solution",
           "normalize_puzzle", "problems"]
