"""`dgserve generate` and `dgserve sudoku`: a running service's denoising steps, live in the terminal.

On a terminal (stdout is a TTY) `generate` prints committed text normally and the current canvas's draft
dimmed after it, rewritten in place at every denoising step (ANSI escapes); `sudoku` redraws its 9x9 grid in
place at every step. Otherwise (a pipe, a file) `generate` prints one line per committed canvas and `sudoku`
the final grid, with no escapes. Usage and timings go to stderr; `--json` prints only the final answer.

Exit status: 0 done, 1 the service failed or is unreachable, 2 invalid input, 130 interrupted (Ctrl-C,
which cancels the request).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import unicodedata
from collections.abc import Callable
from typing import Any, TextIO

from dgserve.client import (
    AuthError,
    Canvas,
    Client,
    DgError,
    Done,
    Error,
    Overloaded,
    Queued,
    RequestFailed,
    RequestTimeout,
    Restarted,
    ServiceUnreachable,
    Step,
    Unavailable,
    ValidationError,
)
from protocol.sudoku import EXAMPLE_PUZZLE, draft_grid, normalize_puzzle, problems

DIM, BOLD, RESET = "\x1b[2m", "\x1b[1m", "\x1b[0m"
HIGHLIGHT = "\x1b[30;103m"  # black on bright yellow: a cell that changed at this step
CLEAR_DOWN, CLEAR_LINE = "\x1b[J", "\x1b[2K"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
CLI_RETRIES = 2  # 429/503 are retried twice, after the service's Retry-After


# ================================================================================ display helpers
def sanitize(text: str) -> str:
    """Text safe to show on a terminal: control characters (escape included) become `·`, tabs a space;
    newlines stay."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append(ch)
        elif ch == "\t":
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cs"):
            out.append("·")
        else:
            out.append(ch)
    return "".join(out)


def char_width(ch: str) -> int:
    """Terminal columns of one (sanitized) character: 2 for wide East Asian ones, 0 for marks."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def advance(text: str, col: int, columns: int) -> tuple[int, int]:
    """Where the cursor ends after writing `text` (sanitized, may hold newlines) from column `col` on a
    terminal `columns` wide: (rows moved down, column). A column equal to `columns` is the pending wrap of a
    full row; a wide character that does not fit at the end of a row wraps early, as terminals do."""
    rows = 0
    for ch in text:
        if ch == "\n":
            rows, col = rows + 1, 0
            continue
        w = char_width(ch)
        if w and col + w > columns:
            rows, col = rows + 1, 0
        col += w
    return rows, col


def rows_spanned(text: str, start_col: int, columns: int) -> int:
    """Rows that `text` covers when written from column `start_col`."""
    return advance(text, start_col, columns)[0] + 1


class LiveText:
    """Committed text printed for good, the current draft shown dimmed after it and rewritten in place.

    The draft starts where the committed text ends (column `col` of its last row); to rewrite it the cursor
    goes back up the rows the previous draft covered, to that column, and clears to the end of the screen.
    """

    def __init__(self, out: TextIO, size: Callable[[], tuple[int, int]] | None = None):
        self.out = out
        self.size = size or (lambda: tuple(shutil.get_terminal_size((80, 24))))  # type: ignore[return-value]
        self.col = 0  # column where the draft starts
        self.rows = 1  # rows the shown draft covers (1: none shown)
        self.shown = False
        self.wrapped = False  # the committed text filled its last row and we moved to a fresh one

    def _after_wrap(self, text: str) -> str:
        # a newline right after a full row adds no row on a terminal (the wrap was pending): we already moved
        return text[1:] if self.wrapped and text.startswith("\n") else text

    def _back(self) -> str:
        if not self.shown:
            return ""
        up = f"\x1b[{self.rows - 1}A" if self.rows > 1 else ""
        right = f"\x1b[{self.col}C" if self.col else ""
        return "\r" + up + right + CLEAR_DOWN

    def _fit(self, draft: str, columns: int, lines: int) -> str:
        """The draft, cut so that the region stays on screen (an escape cannot move above the top row)."""
        budget = max(1, lines - 2)
        if rows_spanned(draft, self.col, columns) <= budget:
            return draft
        lo, hi = 0, len(draft)
        while lo < hi:  # the longest prefix that fits, with its ellipsis
            mid = (lo + hi + 1) // 2
            if rows_spanned(draft[:mid] + "…", self.col, columns) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return draft[:lo] + "…"

    def draft(self, text: str) -> None:
        columns, lines = self.size()
        columns, lines = (columns if columns > 0 else 80), (lines if lines > 0 else 24)
        columns = max(columns, 10)
        shown = self._fit(self._after_wrap(sanitize(text)), columns, lines)
        self.out.write(self._back() + DIM + shown + RESET)
        self.out.flush()
        self.rows, self.shown = rows_spanned(shown, self.col, columns), True

    def commit(self, text: str) -> None:
        """Replace the draft with committed text, printed normally and for good."""
        columns = max(self.size()[0], 10)
        text = self._after_wrap(sanitize(text))
        self.out.write(self._back() + text)
        self.shown, self.rows = False, 1
        if text:
            self.wrapped = False
        _, self.col = advance(text, self.col, columns)
        if self.col >= columns:  # the row is full: start the next draft on a fresh row
            self.out.write("\r\n")
            self.col, self.wrapped = 0, True
        self.out.flush()

    def clear_draft(self) -> None:
        self.out.write(self._back())
        self.shown, self.rows = False, 1
        self.out.flush()

    def notice(self, text: str) -> None:
        """A dim line of its own under the committed text (the draft is dropped)."""
        self.clear_draft()
        self.out.write(("\n" if self.col else "") + DIM + sanitize(text) + RESET + "\n")
        self.col, self.wrapped = 0, False
        self.out.flush()

    def finish(self) -> None:
        self.clear_draft()
        if self.col:
            self.out.write("\n")
        self.col = 0
        self.out.flush()


def _usage_line(done: Done, model: str | None, seed: int | None, elapsed: float | None) -> str:
    u = done.usage
    parts = [f"{u.completion_tokens} tokens", f"{u.canvases} canvas{'es' if u.canvases != 1 else ''}",
             f"{u.denoising_steps} denoising steps", f"{u.tokens_per_forward:.2f} tokens/forward"]
    if elapsed is not None:
        parts.append(f"{elapsed:.2f} s")
    parts.append(f"finish: {done.finish_reason}")
    if model:
        parts.append(f"model {model}")
    if seed is not None:
        parts.append(f"seed {seed}")
    return " · ".join(parts)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ================================================================================ errors
def report_error(exc: DgError, url: str, err: TextIO | None = None) -> int:
    """A clear message on stderr for `exc`; returns the exit status."""
    err = err or sys.stderr
    if isinstance(exc, ServiceUnreachable):
        print(f"dgserve: no service answers at {url} ({exc.reason}): it is not "
              "running, or not there.\nStart one with `./run up` (or `dgserve up`), or point --url / DG_URL at a "
              "running one.", file=err)
        return 1
    if isinstance(exc, AuthError):
        print(f"dgserve: the service refused the API key ({exc.message}): pass --api-key or set DG_API_KEY.",
              file=err)
        return 1
    if isinstance(exc, ValidationError):
        print(f"dgserve: invalid request: {exc}", file=err)
        return 2
    if isinstance(exc, Overloaded | Unavailable):
        what = "overloaded (queue full)" if isinstance(exc, Overloaded) else "unavailable"
        later = f"; retry in {exc.retry_after:g} s" if exc.retry_after is not None else ""
        print(f"dgserve: the service is {what}{later}: {exc.message}", file=err)
        return 1
    if isinstance(exc, RequestFailed):
        print(f"dgserve: the request failed ({exc.code}): {exc.message}", file=err)
        return 1
    if isinstance(exc, RequestTimeout):
        print(f"dgserve: {exc}", file=err)
        return 1
    print(f"dgserve: {exc}", file=err)
    return 1


def _tolerant(*streams: TextIO) -> None:
    """Model text may hold characters the console encoding lacks: print them replaced, never crash."""
    for stream in streams:
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and stream in (sys.stdout, sys.stderr):
            reconfigure(errors="replace")


def _params(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: v for n in names if (v := getattr(args, n, None)) is not None}


# ================================================================================ dgserve generate
def generate_command(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    _tolerant(out, err)
    params = _params(args, "model", "max_new_tokens", "max_denoising_steps", "seed")
    if args.chat:
        request: dict[str, Any] = {"messages": [{"role": "user", "content": args.prompt}]}
    else:
        request = {"prompt": args.prompt}
    with Client(args.url, api_key=args.api_key, retries=CLI_RETRIES) as client:
        try:
            if args.json:
                completion = client.generate(**request, **params)
                print(json.dumps(completion.model_dump(mode="json")), file=out)
                return 0
            return _stream_generation(client, request, params, out, err)
        except DgError as exc:
            return report_error(exc, client.base_url, err)


def _stream_generation(client: Client, request: dict[str, Any], params: dict[str, Any], out: TextIO,
                       err: TextIO) -> int:
    tty = _is_tty(out)
    live = LiveText(out) if tty else None
    if tty:
        out.write(HIDE_CURSOR)
    try:
        with client.stream(**request, **params) as stream:
            for event in stream:
                if isinstance(event, Step):
                    if live:
                        live.draft(event.draft_text)
                elif isinstance(event, Canvas):
                    if live:
                        live.commit(event.text)
                    else:
                        print(event.text, file=out, flush=True)
                elif isinstance(event, Restarted):
                    note = f"restarted on another worker (attempt {event.attempt}): the text starts over"
                    if live:
                        live.notice(note)
                    else:
                        print(f"dgserve: {note}", file=err, flush=True)
            if live:
                live.finish()
    except KeyboardInterrupt:
        if live:
            live.finish()
        out.flush()
        print("dgserve: interrupted; the request was cancelled", file=err)
        return 130
    except DgError:
        if live:
            live.finish()  # drop the draft before the message
        raise
    finally:
        if tty:
            out.write(SHOW_CURSOR + RESET)
            out.flush()
    if isinstance(stream.error, Error):
        return report_error(RequestFailed(stream.error.message, code=stream.error.code,
                                          request_id=stream.error.request_id), client.base_url, err)
    done = stream.result
    if done is None:
        print("dgserve: the stream ended without a result", file=err)
        return 1
    out.flush()
    print(_usage_line(done, stream.model, stream.seed, stream.elapsed), file=err, flush=True)
    return 0


# ================================================================================ dgserve sudoku
def render_grid(puzzle: str, grid: str, changed: set[int] | frozenset[int] = frozenset(), color: bool = True
                ) -> list[str]:
    """The 9x9 grid as 11 lines: givens bold, blanks (`.`) dim, `changed` cells highlighted (with `color`)."""
    lines = []
    for r in range(9):
        if r in (3, 6):
            lines.append("───────┼───────┼──────" if color else "-------+-------+------")
        row = []
        for c in range(9):
            i = 9 * r + c
            ch = grid[i]
            if color:
                if puzzle[i] != "0":
                    ch = BOLD + ch + RESET
                elif i in changed:
                    ch = HIGHLIGHT + ch + RESET
                elif ch == ".":
                    ch = DIM + ch + RESET
            row.append(ch)
            if c in (2, 5):
                row.append("│" if color else "|")
        lines.append(" " + " ".join(row))
    return lines


def _verdict(valid: bool, steps: int | None, puzzle: str, solution: str, elapsed: float | None) -> str:
    took = (f" in {steps} denoising steps" if steps is not None else "") + (
        f" ({elapsed:.2f} s)" if elapsed is not None else "")
    if valid:
        return f"valid: solved{took}"
    why = "; ".join(problems(puzzle, solution))
    return f"not valid{took}: {why}" if why else f"not valid{took}"


def sudoku_command(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    _tolerant(out, err)
    raw = args.puzzle or EXAMPLE_PUZZLE
    try:
        puzzle = normalize_puzzle(raw)
    except ValueError as exc:
        print(f"dgserve: invalid puzzle: {exc}", file=err)
        return 2
    with Client(args.url, api_key=args.api_key, retries=CLI_RETRIES) as client:
        try:
            if args.json:
                result = client.sudoku(puzzle, seed=args.seed)
                print(json.dumps(result.model_dump(mode="json", exclude_none=True)), file=out)
                return 0
            return _stream_sudoku(client, puzzle, args.seed, out, err)
        except DgError as exc:
            if exc.status == 404:
                print(f"dgserve: the service at {client.base_url} has no POST /sudoku endpoint (an older "
                      "version?); run without --json to solve over the WebSocket", file=err)
                return 1
            if isinstance(exc, ValidationError) and exc.field == "model":
                reason = exc.errors[0]["message"]
                print(f"dgserve: the service at {client.base_url} serves no `sudoku` model ({reason})", file=err)
                return 1
            return report_error(exc, client.base_url, err)


def _stream_sudoku(client: Client, puzzle: str, seed: int | None, out: TextIO, err: TextIO) -> int:
    tty = _is_tty(out)
    height = 12  # 11 grid lines + the status line
    previous = draft_grid(puzzle, "")
    drawn = False

    def draw(grid: str, changed: set[int], status: str) -> None:
        nonlocal drawn
        lines = render_grid(puzzle, grid, changed, color=True) + [DIM + status + RESET]
        up = f"\x1b[{height}A" if drawn else ""
        out.write(up + "".join("\r" + CLEAR_LINE + line + "\n" for line in lines))
        out.flush()
        drawn = True

    if tty:
        out.write(HIDE_CURSOR)
        draw(previous, set(), "queued")
    try:
        with client.stream_sudoku(puzzle, seed=seed) as stream:
            for event in stream:
                if isinstance(event, Queued) and tty:
                    draw(previous, set(), f"queued on {event.model} · seed {event.seed}")
                elif isinstance(event, Restarted):
                    previous = draft_grid(puzzle, "")
                elif isinstance(event, Step) and tty:
                    grid = draft_grid(puzzle, event.draft_text, event.draft_ids)
                    changed = {i for i in range(81) if grid[i] != previous[i] and puzzle[i] == "0"}
                    filled = sum(ch != "." for ch in grid)
                    draw(grid, changed, f"step {event.step} · {filled}/81 cells · {len(changed)} changed · "
                                        f"mean entropy {event.mean_entropy:.3f}")
                    previous = grid
    except KeyboardInterrupt:
        print("dgserve: interrupted; the request was cancelled", file=err)
        return 130
    finally:
        if tty:
            out.write(SHOW_CURSOR + RESET)
            out.flush()
    if stream.error is not None:
        e = stream.error
        return report_error(RequestFailed(e.message, code=e.code, request_id=e.request_id), client.base_url, err)
    result = stream.sudoku_result
    if result is None:
        print("dgserve: the stream ended without a result", file=err)
        return 1
    if tty:
        draw(draft_grid(puzzle, result.solution), set(), f"done · {result.steps} denoising steps")
    else:
        print("\n".join(render_grid(puzzle, draft_grid(puzzle, result.solution), color=False)), file=out)
    print(_verdict(result.valid, result.steps, puzzle, result.solution, stream.elapsed), file=out, flush=True)
    return 0


__all__ = ["LiveText", "generate_command", "render_grid", "report_error", "sanitize", "sudoku_command"]
