#!/usr/bin/env python3
"""Runs every example of the README's "Using it" section against a real service and checks what it prints.

    .venv/bin/python scripts/readme_examples.py           # start a service, run every example, check
    .venv/bin/python scripts/readme_examples.py --write   # the same, then write the real outputs into README.md
    .venv/bin/python scripts/readme_examples.py --url http://127.0.0.1:8000   # a service already running

An example is a code block (bash or python) and the output block right after it. The code runs as written, with
only the address changed to the service's and `.venv/bin/...` to this interpreter. Two checks, so that the
README cannot drift from the code again:
  - shape: what the example prints has the form the README promises (the keys of a JSON answer, SSE framing,
    the lines of the CLI and the clients);
  - agreement: the README's output block is what the example prints now, with the volatile parts masked
    (request ids, wall times). Seeds make the rest exact (`DG_TORCH_THREADS=1` on the service started here).
Exit status: 0 everything agrees, 1 a check failed (each is printed), 2 the service could not be started.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dgserve.embedded import workers_ready  # noqa: E402
from dgserve.redis_server import free_port  # noqa: E402

README = ROOT / "README.md"
SECTION = ("## Using it", "## API")
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
MODELS = ("text", "sudoku")


@dataclass
class Example:
    kind: str
    lang: str
    code: str
    output: str
    start: int  # where the output block's body lies in the README's text
    end: int


# ================================================================================ reading the README
def kind_of(lang: str, code: str) -> str:
    if lang == "python":
        return "openai" if "from openai" in code else "client"
    if "curl" in code:
        return "sudoku_curl" if "/sudoku" in code else "sse_curl" if "chat/completions" in code else "generate_curl"
    return "cli_sudoku" if "dgserve sudoku" in code else "cli_generate"


def examples(text: str) -> list[Example]:
    """The (code, output) pairs of the README's "Using it" section."""
    lo, hi = text.index(SECTION[0]), text.index(SECTION[1])
    blocks = [m for m in FENCE.finditer(text, lo, hi)]
    found = []
    for code, out in zip(blocks, blocks[1:], strict=False):
        if code[1] in ("bash", "python") and out[1] not in ("bash", "python"):
            found.append(Example(kind_of(code[1], code[2]), code[1], code[2], out[2], out.start(2), out.end(2)))
    return found


# ================================================================================ running one
def localize(code: str, url: str) -> str:
    host = url.removeprefix("http://")
    return (code.replace("http://127.0.0.1:8000", url).replace("localhost:8000", host)
            .replace("127.0.0.1:8000", host).replace(".venv/bin/python", sys.executable)
            .replace(".venv/bin/dgserve", f"{sys.executable} -m dgserve"))


def run(example: Example, url: str) -> tuple[str, str]:
    """(what the README shows of its output, a problem or "")."""
    code = localize(example.code, url)
    args = [sys.executable, "-c", code] if example.lang == "python" else ["bash", "-c", code]
    env = {k: v for k, v in os.environ.items() if k != "DG_API_KEY"} | {"DG_URL": url}  # the CLI's service
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    if proc.returncode != 0:
        return "", f"exit status {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-800:]}"
    cli = example.kind.startswith("cli_")
    if proc.stderr.strip() and not cli:
        return "", f"printed on stderr: {proc.stderr.strip()[-800:]}"
    out = proc.stdout + (proc.stderr if cli else "")
    return RENDER.get(example.kind, str.rstrip)(out).rstrip() + "\n", ""


# ================================================================================ what the README shows
def render_generate(out: str) -> str:
    """The answer as curl prints it, the token ids cut after two."""
    return re.sub(r'"token_ids":\[(\d+),(\d+),[^\]]*\]', r'"token_ids":[\1,\2,...]', out.strip())


def render_sse(out: str) -> str:
    """`data:` lines, each chunk's id cut short and its bookkeeping fields elided."""
    lines = []
    for line in out.splitlines():
        if not line.strip():
            continue
        body = line.removeprefix("data: ")
        if body == "[DONE]":
            lines.append(line)
            continue
        chunk = json.loads(body)
        head = json.dumps({"id": chunk["id"][:13] + "...", "object": chunk["object"]})[:-1]
        lines.append(f'data: {head}, ..., "choices": {json.dumps(chunk["choices"])}}}')
    return "\n".join(lines)


RENDER: dict[str, Callable[[str], str]] = {"generate_curl": render_generate, "sse_curl": render_sse}
VOLATILE = [
    (re.compile(r'"request_id":\s*"[0-9a-f]+"'), '"request_id":"…"'),
    (re.compile(r"\b(chatcmpl|cmpl)-[0-9a-f]+(\.\.\.)?"), r"\1-…"),
    (re.compile(r"\b\d+\.\d+ s\b"), "… s"),
]


def masked(text: str) -> str:
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    return text.strip()


# ================================================================================ shapes
USAGE = {"prompt_tokens", "completion_tokens", "canvases", "denoising_steps", "tokens_per_forward"}
SUDOKU = {"request_id", "puzzle", "solution", "valid", "problems", "attempts", "attempt", "steps", "total_steps"}


def shape_generate(out: str) -> list[str]:
    body = json.loads(out.replace(",...]", "]"))
    problems = []
    if set(body) != {"request_id", "model", "text", "token_ids", "finish_reason", "usage"}:
        problems.append(f"keys {sorted(body)}")
    if set(body.get("usage", {})) != USAGE:
        problems.append(f"usage keys {sorted(body.get('usage', {}))}")
    if body.get("finish_reason") not in ("stop", "length", "stop_string"):
        problems.append(f"finish_reason {body.get('finish_reason')!r}")
    return problems


def shape_sudoku(out: str) -> list[str]:
    body = json.loads(out)
    problems = [] if set(body) == SUDOKU else [f"keys {sorted(body)}"]
    if len(body.get("solution", "")) != 81 or not isinstance(body.get("valid"), bool):
        problems.append("solution is not 81 cells with a valid flag")
    if not 0 <= body.get("attempt", -1) < body.get("attempts", 0):
        problems.append(f"attempt {body.get('attempt')} of {body.get('attempts')}")
    return problems


def shape_sse(out: str) -> list[str]:
    lines = out.splitlines()
    if not lines or lines[-1] != "data: [DONE]" or not all(line.startswith("data: {") for line in lines[:-1]):
        return ["not `data: {...}` lines ending with `data: [DONE]`"]
    chunks = [json.loads(re.sub(r", \.\.\., ", ", ", line.removeprefix("data: "))) for line in lines[:-1]]
    problems = []
    if any(c["object"] != "chat.completion.chunk" for c in chunks):
        problems.append("a chunk is not a chat.completion.chunk")
    if chunks[0]["choices"][0]["delta"].get("role") != "assistant":
        problems.append("the first chunk does not carry the assistant role")
    if chunks[-1]["choices"][0]["finish_reason"] not in ("stop", "length"):
        problems.append("the last chunk has no finish_reason")
    return problems


class Many(str):
    """A line pattern that may match several lines in a row."""


def shape_lines(*patterns: str) -> Callable[[str], list[str]]:
    """Each line matches the next pattern; a `Many` one takes one or more lines, up to a line the pattern after
    it matches."""

    def check(out: str) -> list[str]:
        lines, i = out.rstrip("\n").split("\n"), 0
        for k, pattern in enumerate(patterns):
            regex = re.compile(pattern)
            after = re.compile(patterns[k + 1]) if k + 1 < len(patterns) else None
            if i >= len(lines) or not regex.fullmatch(lines[i]):
                return [f"line {i + 1} {lines[i] if i < len(lines) else '(none)'!r} does not match {pattern!r}"]
            i += 1
            while (isinstance(pattern, Many) and i < len(lines) and regex.fullmatch(lines[i])
                   and not (after and after.fullmatch(lines[i]))):
                i += 1
        return [] if i == len(lines) else [f"unexpected line {i + 1}: {lines[i]!r}"]

    return check


GRID_ROW = r" [1-9.] [1-9.] [1-9.] \| [1-9.] [1-9.] [1-9.] \| [1-9.] [1-9.] [1-9.]"
SHAPES: dict[str, Callable[[str], list[str]]] = {
    "generate_curl": shape_generate,
    "sudoku_curl": shape_sudoku,
    "sse_curl": shape_sse,
    "openai": shape_lines(r".*", r"CompletionUsage\(completion_tokens=\d+, prompt_tokens=\d+, total_tokens=\d+, .*"
                          r"canvases=\d+, denoising_steps=\d+, tokens_per_forward=[\d.]+\)",
                          Many(r"\d+ '.*'"), Many(r"None '.*'")),
    "client": shape_lines(r".*", Many(r"step \d+: +\d+ accepted  '.*'"),
                          r"prompt_tokens=\d+ completion_tokens=\d+ canvases=\d+ denoising_steps=\d+ "
                          r"tokens_per_forward=[\d.]+", r"True|False"),
    "cli_generate": shape_lines(Many(r".*"), r"\d+ tokens · \d+ canvas(es)? · \d+ denoising steps · [\d.]+ "
                                r"tokens/forward · [\d.]+ s · finish: \w+ · model \w+ · seed \d+"),
    "cli_sudoku": shape_lines(GRID_ROW, GRID_ROW, GRID_ROW, r"-------\+-------\+------", GRID_ROW, GRID_ROW, GRID_ROW,
                              r"-------\+-------\+------", GRID_ROW, GRID_ROW, GRID_ROW,
                              r"(valid: solved|not valid) in \d+ denoising steps \([\d.]+ s\)(: .*)?"),
}


# ================================================================================ the service
def start_service() -> tuple[subprocess.Popen, str, tempfile.TemporaryDirectory]:
    data = tempfile.TemporaryDirectory(prefix="dg-readme-")
    port = free_port()
    log = open(Path(data.name) / "up.log", "wb")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DG_MODELS")}
    proc = subprocess.Popen([sys.executable, "-m", "dgserve", "up", "--port", str(port), "--data-dir",
                             str(Path(data.name) / "redis")], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**env, "DG_TORCH_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while not workers_ready(url, list(MODELS))[0]:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_service(proc)
            raise RuntimeError("dgserve up did not get ready:\n" + (Path(data.name) / "up.log").read_text()[-3000:])
        time.sleep(0.5)
    return proc, url, data


def stop_service(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C: everything stops in order
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ================================================================================ main
def check_all(url: str, text: str) -> tuple[list[str], list[tuple[Example, str]]]:
    problems, outputs = [], []
    found = examples(text)
    kinds = [e.kind for e in found]
    if sorted(kinds) != sorted(SHAPES):
        problems.append(f"README: expected one example of each of {sorted(SHAPES)}, found {kinds}")
    for example in found:
        out, problem = run(example, url)
        where = f"{example.kind} ({example.code.strip().splitlines()[0][:60]})"
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        outputs.append((example, out))
        for name, shown in (("prints", out), ("README shows", example.output)):
            try:
                found_problems = SHAPES[example.kind](shown)
            except (ValueError, KeyError, IndexError) as exc:
                found_problems = [f"unreadable ({exc!r})"]
            problems += [f"{where}: {name}: {p}" for p in found_problems]
        if masked(out) != masked(example.output):
            problems.append(f"{where}: the README shows\n{example.output.rstrip()}\n  but it prints\n{out.rstrip()}")
        print(f"ran {where}", flush=True)
    return problems, outputs


def write(text: str, outputs: list[tuple[Example, str]]) -> None:
    for example, out in sorted(outputs, key=lambda pair: pair[0].start, reverse=True):
        text = text[:example.start] + out + text[example.end:]
    README.write_text(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running service (default: start one with `dgserve up`)")
    ap.add_argument("--write", action="store_true", help="write the real outputs into README.md")
    args = ap.parse_args()
    text = README.read_text()
    proc = data = None
    url = args.url
    if url is None:
        try:
            proc, url, data = start_service()
        except RuntimeError as exc:
            print(f"readme_examples: {exc}", file=sys.stderr)
            return 2
    try:
        problems, outputs = check_all(url.rstrip("/"), text)
    finally:
        if proc is not None:
            stop_service(proc)
        if data is not None:
            data.cleanup()
    if args.write:
        write(text, outputs)
        problems = [p for p in problems if "README shows" not in p]
        print(f"wrote {len(outputs)} outputs into {README.name}")
    for problem in problems:
        print(f"FAIL {problem}")
    print(f"readme_examples: {len(outputs)} examples run, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
