"""The playground (GET /) in a real headless Chromium, driven by Playwright, against real processes: a Redis
server, the gateway and CPU workers serving the committed checkpoints models/text and models/sudoku.

Needs the system's Chromium (Debian's `chromium`; installed here with apt-get when missing and we are root)
and the `playwright` package (the `dev` extra). Playwright never downloads a browser here: it drives
/usr/bin/chromium. Without either the module is skipped, saying why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.procs import Proc, Service

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"text": ROOT / "models" / "text", "sudoku": ROOT / "models" / "sudoku"}
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000
# the first test may install Chromium (apt-get) before it starts
pytestmark = pytest.mark.timeout(1200)
KEY = "k1"

# Bundled example "Simple A" (service/static/sudoku.js): 16 attempts from seed 1 solve it with models/sudoku.
SIMPLE_A = "95.1......6..2....1......8..36.4.......8...4...1..6593.235....9...4....8685...1.."
EXPERT_A = "...23....4.........86..9...6.....1..7.4....62..91..3...2.6...3.8....1.24..1.2...8"

# The gateway, with the playground's router added when service.app does not register it (yet).
GATEWAY = """
import sys
import service.server
from service import app as app_module
from service.routes import playground

def create_app(settings=None):
    app = app_module.create_app(settings)
    if not any(getattr(route, "path", None) == "/" for route in app.routes):
        app.include_router(playground.router)
    return app

service.server.create_app = create_app
from dgserve.cli import main
sys.exit(main(["gateway"]))
"""


# ----------------------------------------------------------------------------------- what the browser needs
def _chromium_path() -> str | None:
    for candidate in (os.environ.get("DG_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _apt_install_chromium() -> str:
    """Install Debian's chromium when we may (root, apt-get); returns what happened, for the skip reason."""
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return "not root, so apt-get cannot install it (apt-get install -y chromium)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    try:
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:  # a fresh machine: no package lists yet
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=600)
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"apt-get install chromium failed: {exc}"
    return "installed" if done.returncode == 0 else f"apt-get install chromium failed: {done.stderr.strip()[-300:]}"


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the `playwright` package is missing: pip install -e '.[dev]' (or pip install playwright)")
    chromium = _chromium_path()
    if chromium is None:
        outcome = _apt_install_chromium()
        chromium = _chromium_path()
        if chromium is None:
            pytest.skip(f"no Chromium for the playground tests ({outcome}); install Debian's `chromium`")
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=60_000)
        except Exception as exc:  # a broken browser install: say so rather than fail every test
            pytest.skip(f"Chromium at {chromium} does not start under Playwright: {exc}")
        yield browser
        browser.close()


# ----------------------------------------------------------------------------------------- the service
class PlaygroundService(Service):
    def start_gateway(self) -> Proc:
        env = {**self.base_env, "DG_PORT": str(self.port), **self.gateway_env}
        self.gateway = Proc("gateway", [sys.executable, "-c", GATEWAY], env, self.log_dir)
        return self.gateway


@pytest.fixture(scope="module")
def served(browser, tmp_path_factory):
    """Redis, a gateway and a worker per model (text, sudoku); a second gateway with API keys on shares
    Redis and the workers."""
    for path in MODELS.values():
        if not (path / "config.json").exists():
            pytest.skip(f"the committed checkpoint {path} is missing")
    logs = tmp_path_factory.mktemp("playground-logs")
    svc = PlaygroundService(MODELS, logs)
    keyed = None
    try:
        svc.start_gateway()
        svc.start_worker("text")
        svc.start_worker("sudoku")
        keyed = PlaygroundService(MODELS, logs / "keyed", redis=svc.redis, gateway_env={"DG_API_KEYS": KEY})
        (logs / "keyed").mkdir()
        keyed.start_gateway()
        svc.wait_ready()
        keyed.wait_ready()
        yield svc, keyed
    finally:
        if keyed is not None:
            keyed.close()
        svc.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.errors = []  # uncaught exceptions in the page fail the test
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    yield page
    context.close()
    assert not page.errors, page.errors


def frames(page) -> list[dict]:
    """Every JSON message the page receives on its WebSockets, as they come."""
    got: list[dict] = []

    def on_ws(ws):
        ws.on("framereceived", lambda payload: got.append(json.loads(payload)))

    page.on("websocket", on_ws)
    return got


def wait_text(page, selector: str, prefix: str) -> None:
    """Until the element's text starts with `prefix` (the page draws on the next animation frame)."""
    page.wait_for_function("([sel, prefix]) => document.querySelector(sel).textContent.startsWith(prefix)",
                           arg=[selector, prefix])


def until(page, condition, timeout_s: float = 10.0) -> None:
    """Until `condition()` holds, letting Playwright deliver events meanwhile."""
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        page.wait_for_timeout(50)
    raise AssertionError(f"not within {timeout_s} s")


def open_page(page, url: str, mode: str = "text") -> None:
    page.goto(f"{url}/#{mode}")
    page.wait_for_selector("html[data-ready=yes]")


# ---------------------------------------------------------------------------------------------- tests
def test_page_and_its_files_come_from_the_gateway(served, page):
    svc, _ = served
    r = httpx.get(svc.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for name, kind in [("playground.js", "text/javascript"), ("api.js", "text/javascript"),
                       ("sudoku.js", "text/javascript"), ("playground.css", "text/css")]:
        f = httpx.get(f"{svc.url}/static/{name}", timeout=10)
        assert f.status_code == 200 and f.headers["content-type"].startswith(kind), name
    assert httpx.get(svc.url + "/static/nope.js", timeout=10).status_code == 404
    assert httpx.get(svc.url + "/static/..%2Fapp.py", timeout=10).status_code == 404

    requests: list[str] = []
    page.on("request", lambda req: requests.append(req.url))
    open_page(page, svc.url)
    page.wait_for_function("() => document.querySelectorAll('#model option').length >= 3")
    options = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert {"text", "sudoku"} <= set(options)
    assert page.input_value("#model") == "text"
    assert page.locator("#text-canvas li").count() == 64  # the text model's canvas, one cell per position
    assert page.is_hidden("#banner")
    # nothing from elsewhere: no CDN, no external fonts
    assert requests and all(u.startswith(svc.url) or u.startswith("data:") for u in requests), requests

    # the tabs answer the keyboard
    page.focus("#tab-text")
    page.keyboard.press("ArrowRight")
    assert page.is_visible("#panel-sudoku") and page.is_hidden("#panel-text")
    assert page.evaluate("() => document.activeElement.id") == "tab-sudoku"
    assert page.locator("#sudoku-grid .sc").count() == 81
    page.keyboard.press("ArrowLeft")
    assert page.is_visible("#panel-text")


def test_text_prompt_streams_every_step_into_the_grid(served, page):
    svc, _ = served
    got = frames(page)
    open_page(page, svc.url)
    # record what the page shows while it streams, not only the end
    page.evaluate("""() => {
        const status = document.getElementById('text-status');
        const label = document.getElementById('text-timeline-label');
        window.seen = {states: [], steps: new Set()};
        new MutationObserver(() => window.seen.states.push(status.dataset.state))
            .observe(status, {attributes: true, childList: true});
        new MutationObserver(() => window.seen.steps.add(label.textContent))
            .observe(label, {childList: true, characterData: true, subtree: true});
    }""")
    page.fill("#prompt", "In the beginning")
    page.fill("#p-max_new_tokens", "96")  # two canvases of 64
    page.fill("#p-stability_threshold", "1000")  # no early stop: every canvas runs all its steps
    page.fill("#p-max_denoising_steps", "12")
    page.fill("#p-seed", "5")
    page.click("#text-run")
    page.wait_for_selector("#text-status[data-state=done]")

    steps = [e for e in got if e["type"] == "step"]
    canvases = [e for e in got if e["type"] == "canvas"]
    done = next(e for e in got if e["type"] == "done")
    assert len(steps) == 24 and len(canvases) == 2 and done["usage"]["denoising_steps"] == 24
    seen = page.evaluate("() => ({states: window.seen.states, steps: window.seen.steps.size})")
    assert "running" in seen["states"] and seen["states"][-1] == "done"
    assert seen["steps"] > 2, seen  # drawn step after step, not only at the end

    # the usage of the `done` event, in the page
    for field in ("completion_tokens", "denoising_steps", "canvases", "prompt_tokens"):
        assert page.inner_text(f"#text-usage [data-usage={field}]") == str(done["usage"][field])
    assert page.inner_text("#text-usage [data-usage=finish_reason]") == done["finish_reason"]

    # the grid shows the last step: one cell per position, its id, its token
    last = steps[-1]
    cells = page.locator("#text-canvas li")
    assert cells.count() == 64
    ids = page.eval_on_selector_all("#text-canvas li .id", "els => els.map(e => Number(e.textContent))")
    assert ids == last["draft_ids"]
    # the last step committed its canvas: every cell is committed text, none a draft
    assert page.locator("#text-canvas li.fin").count() == 64 and page.locator("#text-canvas li.noisy").count() == 0
    # committed canvases as text
    assert page.inner_text("#text-output").replace("\n", "") == done["text"].replace("\n", "")

    # the timeline holds every step: scrub back to the first one
    assert page.get_attribute("#text-timeline", "max") == str(len(steps) - 1)
    page.focus("#text-timeline")
    page.keyboard.press("Home")
    wait_text(page, "#text-timeline-label", "step 1 of canvas 1")
    ids = page.eval_on_selector_all("#text-canvas li .id", "els => els.map(e => Number(e.textContent))")
    assert ids == steps[0]["draft_ids"]
    if steps[0].get("accepted_mask"):  # a step in progress: what it accepted, what it renoised
        accepted = page.locator("#text-canvas li.acc").count()
        assert accepted == sum(steps[0]["accepted_mask"]) == steps[0]["accepted"]
        assert page.locator("#text-canvas li.noisy").count() == 64 - accepted
    assert "draft" in page.get_attribute("#text-output span", "class")  # the first step's draft, not committed
    page.click("#text-live")
    wait_text(page, "#text-timeline-label", "step 12 of canvas 2")


def test_text_view_without_per_position_fields(served, page):
    """Older workers send no draft_tokens / accepted_mask / entropy: the grid falls back to ids and
    marks the cells that changed since the previous step."""
    svc, _ = served

    def strip(ws):
        server = ws.connect_to_server()

        def to_page(message):
            event = json.loads(message)
            if event.get("type") == "step":
                for key in ("draft_tokens", "accepted_mask", "entropy"):
                    event.pop(key, None)
            ws.send(json.dumps(event))

        server.on_message(to_page)

    page.route_web_socket(re.compile(r"/ws/generate"), strip)
    open_page(page, svc.url)
    page.fill("#p-max_new_tokens", "64")
    page.fill("#p-seed", "2")
    page.click("#text-run")
    page.wait_for_selector("#text-status[data-state=done]")
    assert page.get_attribute("#text-canvas", "data-mask") == "no"
    assert page.get_attribute("#text-canvas", "data-tokens") == "no"
    assert re.fullmatch(r"#\d+", page.inner_text("#text-canvas li .tok"))
    assert page.is_hidden("#text-legend .swatch.acc")
    page.focus("#text-timeline")
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")
    wait_text(page, "#text-timeline-label", "step 2 of canvas 1")
    assert page.locator("#text-canvas li.chg").count() > 0  # step 2 changed some positions of step 1


def test_sudoku_runs_to_the_servers_verdict(served, page):
    svc, _ = served
    got = frames(page)
    open_page(page, svc.url, "sudoku")
    # pasted with spaces and line breaks, `.` for blanks
    pasted = "\n".join(" ".join(SIMPLE_A[9 * r: 9 * r + 9]) for r in range(9))
    page.fill("#puzzle", pasted)
    assert page.inner_text("#puzzle-check") == "81 cells, 27 givens."
    page.fill("#attempts", "16")
    page.fill("#sudoku-seed", "1")
    page.click("#sudoku-run")
    page.wait_for_selector("#sudoku-verdict:not([hidden])")
    result = next(e for e in got if e["type"] == "sudoku_result")
    assert result["valid"], result  # an easy puzzle, 16 attempts: solved
    assert page.get_attribute("#sudoku-verdict", "data-state") == "valid"
    assert "Valid solution" in page.inner_text("#sudoku-verdict")
    assert page.get_attribute("#sudoku-status", "data-state") == "done"
    # the grid shows the chosen attempt's solution; the givens styled as givens
    page.wait_for_function("() => document.querySelectorAll('#sudoku-grid .sc:empty').length === 0")
    grid = "".join(page.eval_on_selector_all("#sudoku-grid .sc", "cs => cs.map(c => c.textContent)"))
    assert grid == result["solution"]
    assert page.locator("#sudoku-grid .sc.given").count() == 81 - SIMPLE_A.count(".")
    attempts = page.locator("#sudoku-attempts .attempt")
    assert attempts.count() == len({e["request_id"] for e in got if e["type"] == "queued"}) == 16
    assert page.get_attribute("#sudoku-attempts .attempt.chosen", "data-rid") == result["request_id"]
    # the chosen attempt's last steps may come after the result (two streams): every one is on the timeline
    until(page, lambda: any(e["type"] == "done" and e["request_id"] == result["request_id"] for e in got))
    steps = [e for e in got if e["type"] == "step" and e["request_id"] == result["request_id"]]
    page.wait_for_function("n => document.getElementById('sudoku-timeline').max === String(n)", arg=len(steps) - 1)

    # a hard puzzle with one attempt: whatever the server says, the page says the same
    got.clear()
    page.select_option("#sudoku-example", value="6")  # "Expert A"
    assert page.input_value("#puzzle").replace("\n", "") == EXPERT_A
    page.fill("#attempts", "1")
    page.click("#sudoku-run")
    page.wait_for_selector("#sudoku-verdict:not([hidden])")
    result = next(e for e in got if e["type"] == "sudoku_result")
    assert page.get_attribute("#sudoku-verdict", "data-state") == ("valid" if result["valid"] else "invalid")
    if not result["valid"]:
        assert "Not a valid solution" in page.inner_text("#sudoku-verdict")
        shown = page.eval_on_selector_all("#sudoku-verdict .problems li", "ls => ls.map(l => l.textContent)")
        assert shown == result["problems"] and shown


def test_cancel_a_long_request(served, page):
    svc, _ = served
    got = frames(page)
    open_page(page, svc.url)
    page.fill("#p-max_new_tokens", "1024")  # 16 canvases (max_context 2048)
    page.fill("#p-max_denoising_steps", "200")
    page.fill("#p-stability_threshold", "1000")
    page.click("#text-run")
    page.wait_for_function("() => Number(document.getElementById('text-timeline').max) >= 3")
    assert page.is_enabled("#text-cancel") and page.is_disabled("#text-run")
    page.click("#text-cancel")
    page.wait_for_selector("#text-status[data-state=cancelled]", timeout=15_000)
    assert page.inner_text("#text-status").startswith("Cancelled after")
    assert page.is_enabled("#text-run") and page.is_disabled("#text-cancel")
    assert any(e["type"] == "error" and e["code"] == "cancelled" for e in got)
    assert not any(e["type"] == "done" for e in got)
    assert page.is_hidden("#text-error")

    # again, from the keyboard: Esc cancels the run of the panel shown
    page.click("#text-run")
    page.wait_for_selector("#text-status[data-state=running]")
    page.keyboard.press("Escape")
    page.wait_for_selector("#text-status[data-state=cancelled]", timeout=15_000)
    assert sum(e["type"] == "error" and e["code"] == "cancelled" for e in got) == 2


def test_invalid_parameters_show_the_servers_message(served, page):
    svc, _ = served
    got = frames(page)
    open_page(page, svc.url)
    page.fill("#p-t_min", "-1")
    page.click("#text-run")
    page.wait_for_selector("#text-error:not([hidden])")
    error = next(e for e in got if e["type"] == "error")
    assert error["code"] == "validation_error" and "t_min" in error["message"]
    assert error["message"] in page.inner_text("#text-error")
    assert page.get_attribute("#text-status", "data-state") == "error"
    assert page.is_enabled("#text-run")

    # a Sudoku whose givens conflict: the server's check, in the page
    got.clear()
    page.click("#tab-sudoku")
    page.fill("#puzzle", "55" + "0" * 79)
    page.click("#sudoku-run")
    page.wait_for_selector("#sudoku-error:not([hidden])")
    error = next(e for e in got if e["type"] == "error")
    assert "givens conflict" in error["message"]
    assert error["message"] in page.inner_text("#sudoku-error")
    # a malformed puzzle is named before anything is sent
    page.fill("#puzzle", "123")
    page.click("#sudoku-run")
    assert "a puzzle has 81 cells; got 3" in page.inner_text("#sudoku-error")


def test_api_keys(served, page):
    _, keyed = served
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    got = frames(page)
    open_page(page, keyed.url)
    # without a key: the page says the server wants one, and a run shows the denial
    page.wait_for_selector("#banner:not([hidden])")
    assert "API key" in page.inner_text("#banner") and "401" in page.inner_text("#banner")
    page.click("#text-run")
    page.wait_for_selector("#text-error:not([hidden])")
    assert "401" in page.inner_text("#text-error") and "API key" in page.inner_text("#text-error")
    assert page.get_attribute("#conn", "data-state") == "refused"
    assert page.get_attribute("#text-status", "data-state") == "error"
    assert not got  # the handshake was denied: no message came

    # with the key: stored in this browser, sent as ?api_key=, and the page works
    page.fill("#api-key", "wrong")
    page.press("#api-key", "Enter")
    page.click("#text-run")
    page.wait_for_selector("#text-status[data-state=error]")
    assert "401" in page.inner_text("#text-error")
    page.fill("#api-key", KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#banner", state="hidden")
    page.wait_for_function("() => document.querySelectorAll('#model option').length >= 3")
    page.fill("#p-max_new_tokens", "32")
    page.click("#text-run")
    page.wait_for_selector("#text-status[data-state=done]")
    assert page.is_hidden("#text-error")
    assert sockets[-1].endswith(f"?api_key={KEY}")
    assert page.evaluate("() => localStorage.getItem('dgserve.apiKey')") == KEY
    page.reload()
    page.wait_for_selector("html[data-ready=yes]")
    assert page.input_value("#api-key") == KEY


# ------------------------------------------------------------------------- what a newcomer tripped on (issue 16)
def raw_frames(page) -> tuple[list[str], list[str]]:
    """Every WebSocket frame the page sends and receives, as raw text (Python's json reads 63-bit seeds exactly)."""
    sent: list[str] = []
    received: list[str] = []

    def on_ws(ws):
        ws.on("framesent", lambda payload: sent.append(payload))
        ws.on("framereceived", lambda payload: received.append(payload))

    page.on("websocket", on_ws)
    return sent, received


def of_type(frames: list[str], kind: str) -> list[dict]:
    return [e for e in map(json.loads, frames) if e["type"] == kind]


def test_a_seed_beyond_2_to_the_53_round_trips_exactly(served, page):
    svc, _ = served
    sent, received = raw_frames(page)
    open_page(page, svc.url)
    big = 2**63 - 25  # no float64 holds it: JavaScript's Number would round it
    page.fill("#p-max_new_tokens", "64")
    page.fill("#p-seed", str(big))
    page.click("#text-run")
    page.wait_for_selector("#text-status[data-state=done]")
    assert of_type(sent, "generate")[-1]["seed"] == big
    assert of_type(received, "queued")[-1]["seed"] == big
    assert page.inner_text("#text-usage [data-usage=seed]") == str(big)

    # a random seed (drawn by the server, 63 bits) is shown exactly, and running it again from the page repeats
    # the text token for token
    page.fill("#p-seed", "")
    page.click("#text-run")
    page.wait_for_selector("#text-status[data-state=done]")
    drawn = of_type(received, "queued")[-1]["seed"]
    first = of_type(received, "done")[-1]
    shown = page.inner_text("#text-usage [data-usage=seed]")
    assert shown == str(drawn)
    page.fill("#p-seed", shown)
    page.click("#text-run")
    page.wait_for_selector("#text-status[data-state=done]")
    again = of_type(received, "done")[-1]
    assert of_type(received, "queued")[-1]["seed"] == drawn
    assert again["request_id"] != first["request_id"] and again["token_ids"] == first["token_ids"]


def test_sudoku_attempts_are_numbered_as_the_server_numbers_them(served, page):
    """With a random seed, and the attempts' streams arriving in any order (here: reversed), the attempt the page
    stars is the one the status line names, and it is the server's attempt; no attempt still runs after the
    verdict."""
    svc, _ = served
    attempts = 4
    server_frames: list[str] = []

    def reorder(ws):
        server = ws.connect_to_server()
        held: list[str] = []
        flushed = False

        def to_page(message):
            nonlocal flushed
            server_frames.append(message)
            if flushed:
                ws.send(message)
                return
            held.append(message)
            queued = [m for m in held if json.loads(m)["type"] == "queued"]
            if len(queued) == attempts:  # every stream has started: the queued events reversed, then the rest
                for m in [*reversed(queued), *(m for m in held if m not in queued)]:
                    ws.send(m)
                flushed = True

        server.on_message(to_page)

    page.route_web_socket(re.compile(r"/ws/generate"), reorder)
    sent, _ = raw_frames(page)
    open_page(page, svc.url, "sudoku")
    page.fill("#puzzle", SIMPLE_A)
    page.fill("#attempts", str(attempts))
    page.click("#sudoku-run")
    page.wait_for_selector("#sudoku-verdict:not([hidden])")
    result = of_type(server_frames, "sudoku_result")[-1]
    base = of_type(sent, "sudoku")[-1]["seed"]  # the page drew it: the field was empty
    assert isinstance(base, int) and page.input_value("#sudoku-seed") == ""
    queued = {e["request_id"]: e["seed"] for e in of_type(server_frames, "queued")}
    assert queued[result["request_id"]] == base + result["attempt"]

    status = page.inner_text("#sudoku-status")
    n = result["attempt"] + 1
    assert f"attempt {n} of {attempts}" in status, status
    assert page.inner_text("#sudoku-attempts .attempt.chosen .alabel b") == f"#{n} ★"
    assert page.get_attribute("#sudoku-attempts .attempt.chosen", "data-rid") == result["request_id"]
    for button in page.locator("#sudoku-attempts .attempt").all():  # every number is its seed's
        number = int(button.locator(".alabel b").inner_text().strip("#★ "))
        assert queued[button.get_attribute("data-rid")] == base + number - 1
    page.wait_for_timeout(1500)  # steps still in flight when the verdict came
    states = page.eval_on_selector_all("#sudoku-attempts .attempt", "bs => bs.map(b => b.dataset.state)")
    assert not {"running", "queued"} & set(states), states
    labels = page.eval_on_selector_all("#sudoku-attempts .attempt .alabel", "ls => ls.map(l => l.textContent)")
    assert not any("running" in label for label in labels), labels
    # the answer is shown as an answer: no cell of it is a renoised draft
    assert page.locator("#sudoku-grid .sc.noisy").count() == 0


def test_nothing_of_a_previous_run_stays_on_screen(served, page):
    svc, _ = served
    sent, received = raw_frames(page)
    open_page(page, svc.url)
    # the badge says the truth on load: the server is up, the connection open
    page.wait_for_selector("#conn[data-state=open]")
    assert page.inner_text("#conn") == "connected"

    page.evaluate("""() => {
        const status = document.getElementById('text-status');
        window.views = [];
        new MutationObserver(() => window.views.push({
            state: status.dataset.state, usageHidden: document.getElementById('text-usage').hidden,
            step: document.getElementById('text-stat-step').textContent,
            label: document.getElementById('text-timeline-label').textContent,
        })).observe(status, {attributes: true, childList: true});
    }""")
    page.fill("#p-max_new_tokens", "64")
    page.fill("#p-stability_threshold", "1000")  # every step runs: the last one still renoises some positions
    page.fill("#p-max_denoising_steps", "12")
    page.fill("#p-seed", "3")
    page.click("#text-run")
    page.wait_for_selector("#text-status[data-state=done]")
    last = of_type(received, "step")[-1]
    assert 0 in last["accepted_mask"]  # the event's mask has renoised positions ...
    # ... but at "Done" the canvas is committed text: no cell is styled as a draft
    assert page.locator("#text-canvas li.noisy").count() == 0
    assert page.locator("#text-canvas li.fin").count() == 64
    assert not page.is_hidden("#text-usage")

    # a new run shows none of the last one's usage, stats or steps while it starts
    page.evaluate("() => { window.views = []; }")
    page.click("#text-run")
    page.wait_for_selector("#text-status[data-state=done]")
    views = page.evaluate("() => window.views")
    starting = [v for v in views if v["state"] in ("connecting", "queued")]
    assert starting and all(v["usageHidden"] and v["step"] == "–" and v["label"] == "no steps yet"
                            for v in starting), views

    # an error after a finished run: nothing of that run stays either
    page.fill("#p-t_min", "-1")
    page.click("#text-run")
    page.wait_for_selector("#text-status[data-state=error]")
    assert page.is_hidden("#text-usage")
    assert [page.inner_text(f"#text-stat-{k}") for k in ("canvas", "step", "accepted", "entropy")] == ["–"] * 4
    assert page.inner_text("#text-timeline-label") == "no steps yet"
    assert page.locator("#text-canvas li.empty").count() == 64


def test_replay_shows_every_step_at_a_watchable_pace(served, page):
    svc, _ = served
    open_page(page, svc.url)
    page.fill("#p-max_new_tokens", "64")
    page.fill("#p-stability_threshold", "1000")
    page.fill("#p-max_denoising_steps", "10")
    page.fill("#p-seed", "4")
    assert page.is_disabled("#text-replay")
    page.click("#text-run")
    page.wait_for_selector("#text-status[data-state=done]")
    page.select_option("#text-speed", "16")
    page.evaluate("""() => {
        const label = document.getElementById('text-timeline-label');
        window.shown = [];
        new MutationObserver(() => window.shown.push([label.textContent, performance.now()]))
            .observe(label, {childList: true, characterData: true, subtree: true});
    }""")
    page.click("#text-replay")
    assert page.inner_text("#text-replay") == "Stop"
    page.wait_for_function("() => document.getElementById('text-replay').textContent === 'Replay'", timeout=10_000)
    shown = page.evaluate("() => window.shown")
    order = []
    for text, _ in shown:
        m = re.search(r"· (\d+) / 10", text)
        if m and (not order or order[-1] != int(m[1])):
            order.append(int(m[1]))
    assert order == list(range(1, 11)), shown  # every step, once, in order
    assert any("(replay)" in text for text, _ in shown)
    assert page.inner_text("#text-timeline-label").startswith("step 10 of canvas 1 · 10 / 10")
