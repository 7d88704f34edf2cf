"""The Python client (`dgserve.client`) and the terminal commands (`dgserve generate`, `dgserve sudoku`) against
real processes: Redis, the gateway, CPU workers. A second service has API keys on, a tiny queue limit, a
model no worker serves (to fill its queue) and a Sudoku-shaped model (a character tokenizer over
"0123456789.", canvas 81, untrained) served by a worker."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import websockets.sync.client as ws_sync

from dgserve.client import (
    AsyncClient,
    AuthError,
    Canvas,
    Client,
    Completion,
    DgError,
    Done,
    Error,
    Overloaded,
    Queued,
    RequestFailed,
    Restarted,
    ServiceUnreachable,
    Step,
    StreamState,
    SudokuResult,
    Unavailable,
    ValidationError,
    error_from_event,
    error_from_http,
    sudoku_stream_body,
)
from dgserve.redis_server import free_port
from dgserve.terminal import advance, render_grid, sanitize
from protocol.sudoku import EXAMPLE_PUZZLE, EXAMPLE_SOLUTION, canvas_cells, is_valid_solution, normalize_puzzle
from tests.procs import Service

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-1"
QUEUE_LIMIT = 32  # of the second service: room for POST /sudoku's parallel attempts (at most 32)


def dgserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m dgserve ...` as a subprocess; stdout/stderr as bytes (texts may hold any character)."""
    return subprocess.run([sys.executable, "-m", "dgserve", *args], capture_output=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "DG_URL": "", "DG_API_KEY": ""})


def fill_queue(ws_url: str, model: str) -> None:
    """Queue requests for `model` (which no worker serves) up to the limit, on one connection. Closing it
    cancels them, but their entries stay in the model's queue, so the queue stays full."""
    with ws_sync.connect(ws_url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
        for i in range(QUEUE_LIMIT):
            ws.send(json.dumps({"type": "generate", "prompt": "wait forever", "model": model, "ref": str(i)}))
        for _ in range(QUEUE_LIMIT):
            event = json.loads(ws.recv(timeout=30))
            assert event["type"] == "queued" or event.get("code") == "overloaded", event


@pytest.fixture(scope="module")
def sudoku_checkpoint(tmp_path_factory) -> Path:
    from training.checkpoints import char_tokenizer, generation_config, random_model, save_checkpoint, tiny_config

    tok = char_tokenizer("0123456789.")
    model = random_model(tiny_config(vocab_size=len(tok), canvas_length=81), seed=0)
    model.generation_config = generation_config(max_new_tokens=81, max_denoising_steps=6)
    return save_checkpoint(model, tok, tmp_path_factory.mktemp("ckpt") / "sudoku")


@pytest.fixture(scope="module", autouse=True)
def keyed_boot(request, tmp_path_factory):
    """Starts the second service (its own Redis) at the start of the module, so that it boots while the first
    one does; `keyed` waits for it. Only when a selected test of this module uses it."""
    wanted = any("keyed" in getattr(item, "fixturenames", ()) for item in request.session.items
                 if getattr(item, "module", None) is request.module)
    if not wanted:
        yield None
        return
    checkpoint = request.getfixturevalue("sudoku_checkpoint")
    svc = Service({"sudoku": checkpoint, "lonely": checkpoint}, tmp_path_factory.mktemp("keyed-logs"),
                  gateway_env={"DG_API_KEYS": KEY, "DG_MAX_QUEUE_DEPTH": str(QUEUE_LIMIT),
                               "DG_RETRY_AFTER_S": "1"})
    try:
        svc.start_gateway()
        svc.start_worker("sudoku")
        yield svc
    finally:
        svc.close()


@pytest.fixture(scope="module")
def keyed(keyed_boot):
    """A second service: API keys on, queue limit QUEUE_LIMIT, Retry-After 1 s; `lonely` has no worker,
    `sudoku` (the default model) has one."""
    keyed_boot.wait_ready(models=["sudoku"])
    return keyed_boot


# ============================================================================ no service needed
def test_sudoku_validator():
    assert is_valid_solution(EXAMPLE_PUZZLE, EXAMPLE_SOLUTION)
    assert is_valid_solution(EXAMPLE_PUZZLE.replace("0", "."), [int(c) for c in EXAMPLE_SOLUTION])
    assert is_valid_solution("0" * 81, EXAMPLE_SOLUTION)
    swapped = EXAMPLE_SOLUTION[1] + EXAMPLE_SOLUTION[0] + EXAMPLE_SOLUTION[2:]  # rows still fine, columns not
    assert not is_valid_solution("0" * 81, swapped)
    other_givens = "1" + EXAMPLE_PUZZLE[1:]  # the given 5 in the corner is not the solution's
    assert not is_valid_solution(other_givens, EXAMPLE_SOLUTION)
    assert not is_valid_solution(EXAMPLE_PUZZLE, EXAMPLE_SOLUTION[:80] + ".")
    assert not is_valid_solution(EXAMPLE_PUZZLE, EXAMPLE_SOLUTION[:80])
    assert not is_valid_solution(EXAMPLE_PUZZLE, "5" * 81)
    grid = "\n".join(" ".join(EXAMPLE_PUZZLE[9 * r: 9 * r + 9]) for r in range(9)).replace("0", ".")
    assert normalize_puzzle(grid) == EXAMPLE_PUZZLE
    underlined = "\n".join(EXAMPLE_PUZZLE[9 * r: 9 * r + 9] + ("\n_________" if r % 3 == 2 else "") for r in range(9))
    assert normalize_puzzle(underlined) == EXAMPLE_PUZZLE  # `_` of a pasted grid is ignored, as documented
    with pytest.raises(ValueError, match="81 cells"):
        normalize_puzzle("123")
    # a step's text with fewer than 81 characters (special tokens dropped): cells come from the ids
    ids = [9 + int(c) if c != "0" else 1 for c in EXAMPLE_PUZZLE]
    assert canvas_cells(EXAMPLE_PUZZLE, "53", ids) == EXAMPLE_PUZZLE.replace("0", ".")


def test_http_and_event_errors_map_to_types():
    e = error_from_http(429, {"Retry-After": "2"}, b'{"detail": "server overloaded", "code": "overloaded"}')
    assert isinstance(e, Overloaded) and e.retry_after == 2.0 and e.status == 429
    assert isinstance(error_from_http(503, {"retry-after": "1"}, b'{"detail": "x"}'), Unavailable)
    assert isinstance(error_from_http(401, {}, b'{"detail": "missing or invalid API key"}'), AuthError)
    e = error_from_http(422, {}, json.dumps({"detail": [{"loc": ["body", "seed"], "msg": "too big"}]}).encode())
    assert isinstance(e, ValidationError) and e.field == "seed" and str(e) == "seed: too big"
    e = error_from_http(504, {}, b'{"detail": "waited too long", "code": "timeout", "request_id": "r1"}')
    assert isinstance(e, RequestFailed) and e.code == "timeout" and e.request_id == "r1"
    e = error_from_event({"type": "error", "request_id": None, "code": "validation_error",
                          "message": "t_min: Input should be greater than or equal to 0; seed: a; b",
                          "errors": [{"field": "t_min", "message": "Input should be greater than or equal to 0"},
                                     {"field": "seed", "message": "a; b"}]})
    assert isinstance(e, ValidationError) and e.field == "t_min" and [x["field"] for x in e.errors] == ["t_min", "seed"]
    assert e.errors[1]["message"] == "a; b"  # read from `errors`, never split out of the prose
    e = error_from_event({"type": "error", "request_id": None, "code": "validation_error", "message": "seed: bad",
                          "errors": [{"field": None, "message": "seed: bad"}]})
    assert e.field is None  # prose that looks like a field is not taken for one
    assert isinstance(error_from_event({"code": "overloaded", "message": "m", "retry_after": 2}), Overloaded)


def test_stream_state_drops_drafts_on_restart():
    state = StreamState({"prompt": "x"})
    rid = "r1"
    assert isinstance(state.on_queued_or_rejection(
        {"type": "queued", "request_id": rid, "model": "m", "prompt_tokens": 2, "seed": 1, "ref": state.ref}), Queued)
    step = {"type": "step", "request_id": rid, "canvas": 1, "step": 1, "draft_ids": [5], "draft_text": "a",
            "accepted": 1, "mean_entropy": 0.5, "added_later": True}
    canvas = {"type": "canvas", "request_id": rid, "canvas": 1, "token_ids": [5], "text": "a", "steps": 1}
    for data in (step, canvas):
        state.on_event(data)
    assert state.text == "a"
    assert isinstance(state.on_event({"type": "restarted", "request_id": rid, "attempt": 2}), Restarted)
    assert state.text == "" and state.draft is None and state.restarts == 1
    assert state.on_event({**step, "request_id": "someone-else"}) is None
    assert state.on_event({"type": "from_the_future", "request_id": rid}) is None
    state.on_event({**canvas, "text": "b"})
    usage = {"prompt_tokens": 2, "completion_tokens": 1, "canvases": 1, "denoising_steps": 1, "tokens_per_forward": 1}
    done = state.on_event({"type": "done", "request_id": rid, "text": "b", "token_ids": [5], "finish_reason": "length",
                            "usage": usage})
    assert isinstance(done, Done) and state.finished and state.result == done and state.text == "b"
    assert state.completion == Completion(request_id=rid, model="m", text="b", token_ids=[5], finish_reason="length",
                                          usage=done.usage)


def test_terminal_helpers():
    assert sanitize("a\x1b[2Jb\tc\n") == "a·[2Jb c\n"
    assert advance("abcd", 0, 4) == (0, 4)  # a full row: the wrap is pending
    assert advance("abcde", 0, 4) == (1, 1)
    assert advance("ab\ncd", 2, 4) == (1, 2)
    assert advance("a漢", 1, 4) == (0, 4) and advance("ab漢", 1, 4) == (1, 2)  # a wide character wraps early
    lines = render_grid(EXAMPLE_PUZZLE, EXAMPLE_PUZZLE.replace("0", "."), color=False)
    assert len(lines) == 11 and lines[0] == " 5 3 . | . 7 . | . . ." and len({len(x) for x in lines}) == 1


def test_unreachable_service_is_named_with_how_to_start_it():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnreachable, match="connection refused"), Client(url) as client:
        client.generate("hi")
    with pytest.raises(ServiceUnreachable), Client(url) as client:
        client.stream("hi").wait()
    r = dgserve("generate", "hi", "--url", url)
    assert r.returncode == 1
    assert b"no service answers at" in r.stderr and b"./run up" in r.stderr, r.stderr


# ============================================================================ the client against the service
def test_generate_sync(service):
    with Client(service.url) as client:
        c = client.generate("The quick brown fox", max_new_tokens=40, seed=3)
        chat = client.generate(messages=[{"role": "user", "content": "The quick brown fox"}], max_new_tokens=8,
                               seed=3)
    assert isinstance(c, Completion) and c.model == "tiny" and c.text and 0 < len(c.token_ids) <= 40
    assert c.finish_reason in ("stop", "length") and c.usage.completion_tokens == len(c.token_ids)
    assert c.usage.tokens_per_forward == pytest.approx(len(c.token_ids) / c.usage.denoising_steps, abs=1e-3)
    assert chat.usage.prompt_tokens > c.usage.prompt_tokens + 4  # the chat template's turn markers


async def test_generate_async_and_idempotency(service):
    async with AsyncClient(service.url) as client:
        a = await client.generate("Sphinx of black quartz", max_new_tokens=16, seed=11, idempotency_key="k-async-1")
        again = await client.generate("Sphinx of black quartz", max_new_tokens=16, seed=11,
                                      idempotency_key="k-async-1")
    assert again.request_id == a.request_id and again.token_ids == a.token_ids


def test_stream_sync_every_step_and_canvases_add_up(service):
    with Client(service.url) as client:
        # seed 0 draws no EOS in the first canvases of this untrained model: several canvases to add up
        with client.stream("In the beginning", max_new_tokens=80, max_denoising_steps=6, seed=0) as stream:
            assert stream.request_id is not None  # known once queued, before the first step
            events = list(stream)
        post = client.generate("In the beginning", max_new_tokens=80, max_denoising_steps=6, seed=0)
    assert isinstance(events[0], Queued) and events[0].request_id == stream.request_id
    assert isinstance(events[-1], Done) and stream.result == events[-1] and stream.error is None
    steps = [e for e in events if isinstance(e, Step)]
    canvases = [e for e in events if isinstance(e, Canvas)]
    done = stream.result
    assert len(steps) == done.usage.denoising_steps and len(canvases) == done.usage.canvases >= 2
    for c in canvases:
        assert [s.step for s in steps if s.canvas == c.canvas] == list(range(1, c.steps + 1))
    assert all(len(s.draft_ids) == 32 for s in steps)
    assert "".join(c.text for c in canvases) == done.text == stream.text
    assert stream.completion is not None and stream.completion.token_ids == post.token_ids  # same seed, same tokens
    assert stream.elapsed is not None and stream.elapsed > 0 and stream.model == "tiny" and stream.seed == 0


async def test_stream_async_filters(service):
    async with AsyncClient(service.url) as client:
        async with client.stream("Pack my box", max_new_tokens=40, seed=2) as stream:
            numbers = [s.step async for s in stream.steps()]
        assert stream.result is not None and len(numbers) == stream.result.usage.denoising_steps
        other = client.stream("Pack my box", max_new_tokens=40, seed=2)  # no `async with`: connects on first event
        texts = [c.text async for c in other.canvases()]
        assert "".join(texts) == stream.result.text == (await other.wait()).text


def test_cancel_mid_stream_gives_a_cancelled_error(service):
    with Client(service.url) as client:
        # untrained: 500 steps would run in full without the cancel
        with client.stream("cancel me", max_denoising_steps=500, seed=5) as stream:
            events = []
            for event in stream:
                events.append(event)
                if isinstance(event, Step) and event.step == 3:
                    stream.cancel()
        assert isinstance(events[-1], Error) and events[-1].code == "cancelled" and stream.error == events[-1]
        assert 3 <= sum(isinstance(e, Step) for e in events) < 40
        assert stream.result is None and not any(isinstance(e, Canvas) for e in events)
        with pytest.raises(RequestFailed) as info:
            stream.wait()
        assert info.value.code == "cancelled" and info.value.request_id == stream.request_id
        # cancelled before it was even queued: sent as soon as the request id is known
        early = client.stream("cancel me early", max_denoising_steps=500)
        early.cancel()
        assert isinstance(list(early)[-1], Error) and early.error.code == "cancelled"


async def test_cancel_async(service):
    async with AsyncClient(service.url) as client:
        async with client.stream("cancel me", max_denoising_steps=500, seed=6) as stream:
            async for step in stream.steps():
                if step.step == 2:
                    await stream.cancel()
        assert stream.error is not None and stream.error.code == "cancelled"


@pytest.mark.parametrize("params, field, words", [
    ({"max_denoising_steps": 0}, "max_denoising_steps", "greater than or equal to 1"),
    ({"t_min": -1}, "t_min", "greater than or equal to 0"),
    ({"model": "nope"}, "model", "unknown model"),
])
def test_invalid_input_raises_validation_error_naming_the_field(service, params, field, words):
    with Client(service.url) as client:
        with pytest.raises(ValidationError) as post:
            client.generate("x", **params)
        with pytest.raises(ValidationError) as ws:
            client.stream("x", **params).wait()
    assert post.value.status == 422 and post.value.field == field and words in str(post.value)
    assert ws.value.field == field and words in str(ws.value)


def test_api_key_and_overload(keyed):
    with Client(keyed.url) as anonymous:
        with pytest.raises(AuthError):
            anonymous.generate("hi", max_new_tokens=8)
        with pytest.raises(AuthError):
            anonymous.stream("hi", max_new_tokens=8).wait()
    with Client(keyed.url, api_key=KEY, retries=1) as client:
        assert client.generate("hi", max_new_tokens=8, seed=1).model == "sudoku"
        assert isinstance(client.stream("hi", max_new_tokens=8, seed=1).wait(), Done)
        fill_queue(keyed.ws_url, "lonely")
        started = time.monotonic()
        with pytest.raises(Overloaded) as info:
            client.generate("hi", model="lonely")
        assert info.value.retry_after == 1 and time.monotonic() - started >= 0.9  # one retry after Retry-After
        with pytest.raises(Overloaded):
            client.stream("hi", model="lonely").wait()


def test_stream_sudoku_clamps_the_givens(keyed):
    with Client(keyed.url, api_key=KEY) as client, client.stream_sudoku(EXAMPLE_PUZZLE, seed=3) as stream:
        steps, grids = [], []
        for step in stream.steps():
            steps.append(step)
            grids.append(stream.grid)
    result = stream.sudoku_result
    assert steps and all(len(g) == 81 for g in grids) and all(len(s.draft_ids) == 81 for s in steps)
    assert result is not None and stream.model == "sudoku" and result.steps == len(steps)
    assert result.puzzle == EXAMPLE_PUZZLE and len(result.solution) == 81
    # the template keeps every given in place at every step, whatever the (untrained) model drafts;
    # in this checkpoint's character tokenizer digit d is token 9 + d
    givens = {i: 9 + int(p) for i, p in enumerate(EXAMPLE_PUZZLE) if p != "0"}
    assert all(s.draft_ids[i] == tok for s in steps for i, tok in givens.items())
    assert all(result.solution[i] in (EXAMPLE_PUZZLE[i], ".") for i in givens)  # "." past an early EOS
    assert result.valid == is_valid_solution(EXAMPLE_PUZZLE, result.solution)
    body = sudoku_stream_body(EXAMPLE_PUZZLE.replace("0", "."), seed=3)
    assert body["prompt"] == body["template"] == EXAMPLE_PUZZLE and body["template_hole"] == "0"


# ============================================================================ the terminal commands
def test_cli_generate_json(service):
    r = dgserve("generate", "hi", "--url", service.url, "--json", "--max-new-tokens", "16", "--seed", "1")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert set(answer) == {"request_id", "model", "text", "token_ids", "finish_reason", "usage"}
    assert len(answer["token_ids"]) == 16 and answer["usage"]["completion_tokens"] == 16
    with Client(service.url) as client:
        assert client.generate("hi", max_new_tokens=16, seed=1).token_ids == answer["token_ids"]


def test_cli_generate_plain_output_is_one_line_per_canvas(service):
    r = dgserve("generate", "In the beginning", "--url", service.url, "--max-new-tokens", "80", "--seed", "4")
    assert r.returncode == 0, r.stderr
    with Client(service.url) as client, client.stream("In the beginning", max_new_tokens=80, seed=4) as stream:
        canvases = list(stream.canvases())
    u = stream.result.usage
    assert len(canvases) == u.canvases >= 2
    assert r.stdout.decode() == "".join(c.text + "\n" for c in canvases)  # no escapes, no drafts
    usage = r.stderr.decode()
    assert f"{u.completion_tokens} tokens · {u.canvases} canvases · {u.denoising_steps} denoising steps" in usage
    assert "tokens/forward" in usage


def _disconnected(url: str) -> float:
    """Requests the gateway saw their client leave before the end."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    return sum(s.value for s in families["dgserve:gateway_request_finished"].samples
               if s.name.endswith("_total") and s.labels["outcome"] == "client_disconnected")


def test_ctrl_c_on_dgserve_generate_cancels_the_request(service):
    """Ctrl-C while the steps stream: exit 130 at once, the connection closed, and the gateway cancels the
    request (the sync client's call on its own loop is stopped too)."""
    before = _disconnected(service.url)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dgserve", "generate", "interrupt me", "--url", service.url,
                             "--steps", "500", "--seed", "1"], stdout=follower, stderr=follower, cwd=ROOT)
    os.close(follower)
    raw = b""
    while b"\x1b[2m" not in raw:  # a draft: the steps stream
        raw += os.read(leader, 65536)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    assert proc.wait(timeout=10) == 130 and time.monotonic() - started < 5
    with contextlib.suppress(OSError):
        while chunk := os.read(leader, 65536):
            raw += chunk
    os.close(leader)
    assert b"interrupted; the request was cancelled" in raw and b"Traceback" not in raw
    deadline = time.monotonic() + 10
    while _disconnected(service.url) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _disconnected(service.url) == before + 1


async def test_the_sync_client_works_inside_a_running_event_loop(service):
    """The sync client runs the async one on a loop of its own: a program with its own loop may call it."""
    with Client(service.url) as client:
        assert client.generate("hi", max_new_tokens=8, seed=1).usage.completion_tokens == 8
        assert isinstance(client.stream("hi", max_new_tokens=8, seed=1).wait(), Done)


def test_cli_generate_on_a_terminal_rewrites_the_draft(service):
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dgserve", "generate", "In the beginning", "--url", service.url,
                             "--max-new-tokens", "40", "--seed", "4", "--steps", "5"],
                            stdout=follower, stderr=follower, cwd=ROOT)
    os.close(follower)
    raw = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        raw += chunk
    assert proc.wait(timeout=30) == 0
    os.close(leader)
    out = raw.decode("utf-8", "replace")
    with Client(service.url) as client, client.stream("In the beginning", max_new_tokens=40, seed=4,
                                                      max_denoising_steps=5) as stream:
        events = list(stream)
    steps = sum(isinstance(e, Step) for e in events)
    assert out.count("\x1b[2m") == steps  # every step's draft, dimmed
    assert out.count("\x1b[J") >= steps  # ... rewritten in place
    for c in (e for e in events if isinstance(e, Canvas)):
        assert sanitize(c.text).replace("\n", "\r\n") in out  # committed text, printed plainly
    u = stream.result.usage
    assert f"{u.completion_tokens} tokens · {u.canvases} canvas" in out


def test_cli_sudoku_streams_the_grid(keyed):
    r = dgserve("sudoku", "--url", keyed.url, "--api-key", KEY, "--seed", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert len(lines) == 12 and lines[0].startswith(" 5 3 ") and "\x1b" not in r.stdout.decode()
    assert lines[-1].startswith(("valid", "not valid")) and "denoising steps" in lines[-1]
    bad = dgserve("sudoku", "12345", "--url", keyed.url)
    assert bad.returncode == 2 and b"81 cells" in bad.stderr
    wrong_key = dgserve("sudoku", "--url", keyed.url, "--api-key", "wrong")
    assert wrong_key.returncode == 1 and b"API key" in wrong_key.stderr


def test_cli_sudoku_json(keyed):
    r = dgserve("sudoku", "--url", keyed.url, "--api-key", KEY, "--json", "--seed", "1")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer["puzzle"].replace(".", "0") == EXAMPLE_PUZZLE and len(answer["solution"]) == 81
    assert answer["valid"] == is_valid_solution(EXAMPLE_PUZZLE, answer["solution"])
    assert set(answer) == set(SudokuResult.model_fields)  # the gateway's own answer, every field
    with Client(keyed.url, api_key=KEY) as client:
        result = client.sudoku(EXAMPLE_PUZZLE, seed=1, attempts=2)
    assert isinstance(result, SudokuResult) and result.attempts == 2 and 0 <= result.attempt < 2
    assert result.total_steps >= result.steps > 0
    assert result.valid == is_valid_solution(EXAMPLE_PUZZLE, result.solution)


def test_dg_error_is_the_base_of_every_error():
    for cls in (ValidationError, Overloaded, Unavailable, AuthError, RequestFailed, ServiceUnreachable):
        assert issubclass(cls, DgError)


# ----------------------------------------------------------------------------- the command line's help
def _subcommands(parser) -> dict:
    """`dgserve`'s subcommand parsers by name."""
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices


def test_every_command_and_flag_says_what_it_is():
    from dgserve.cli import build_parser

    for name, sub in _subcommands(build_parser()).items():
        if name == "train":  # its flags are training's own: `dgserve train --help` below
            continue
        assert sub.description, f"`dgserve {name}` has no description"
        for action in sub._actions:
            assert action.help, f"dgserve {name} {'/'.join(action.option_strings) or action.dest}: no help"
    for name in ("generate", "sudoku"):
        text = dgserve(name, "--help").stdout.decode()
        assert "DG_URL" in text and "DG_API_KEY" in text, text
    assert "DG_URL" in dgserve("--help").stdout.decode()


def test_dgserve_train_help_is_training_help_under_its_own_name():
    shown = dgserve("train", "--help")
    assert shown.returncode == 0, shown.stderr.decode()
    text = shown.stdout.decode()
    assert text.startswith("usage: dgserve train") and "sudoku" in text and "python -m training [" not in text
    sub = dgserve("train", "sudoku", "--help")
    assert sub.returncode == 0 and sub.stdout.decode().startswith("usage: dgserve train sudoku")
    bare = dgserve("train")
    assert bare.returncode == 2 and bare.stderr.decode().startswith("usage: dgserve train")


# ----------------------------------------------------------------------------- the README's examples
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_examples_run_as_written_and_print_what_the_readme_shows():
    """scripts/readme_examples.py starts `dgserve up` with the committed models, runs every example of the
    README's "Using it" section (curl, the openai client, our client, the CLI) and compares what each prints
    with the README (ids and wall times masked). A change that alters an output fails here: rerun the script
    with --write and commit the README."""
    if not shutil.which("curl"):
        pytest.skip("the README's curl examples need curl (apt-get install curl)")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_examples.py")], capture_output=True,
                          text=True, timeout=800, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "readme_examples: 7 examples run, 0 problems", proc.stdout
