"""Screenshots of the playground for the README: both modes mid-denoising and at the end.

    ./run up                                   # in another terminal: the service on 127.0.0.1:8000
    .venv/bin/python scripts/screenshots.py [--url http://127.0.0.1:8000] [--api-key KEY] [--out docs/screenshots]

Drives the system Chromium (/usr/bin/chromium, or --chromium) with Playwright; no browser is downloaded.
To catch a canvas mid-denoising, the script routes the page's WebSocket and holds the server's messages
back once a chosen step has arrived: the picture shows exactly what the page drew live at that step;
then the rest goes through and the page runs to its end.

Writes text-denoising.png, text-done.png, sudoku-denoising.png, sudoku-solved.png, sudoku-not-solved.png.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Gate:
    """The page's WebSocket, proxied: server messages pass until `pause_when(event)` says stop."""

    def __init__(self) -> None:
        self.pause_when: Callable[[dict], bool] | None = None
        self.paused = False
        self.held: list[str | bytes] = []
        self.ws = None

    def route(self, ws) -> None:
        self.ws = ws
        server = ws.connect_to_server()

        def to_page(message: str | bytes) -> None:
            if self.paused:
                self.held.append(message)
                return
            ws.send(message)
            if self.pause_when is not None and self.pause_when(json.loads(message)):
                self.paused = True

        server.on_message(to_page)

    def release(self) -> None:
        self.pause_when = None
        self.paused = False
        held, self.held = self.held, []
        for message in held:
            self.ws.send(message)


def shoot(page, path: Path) -> None:
    page.wait_for_timeout(350)  # let the cell transitions settle
    page.screenshot(path=str(path), full_page=True)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def text_mode(page, gate: Gate, url: str, out: Path) -> None:
    page.goto(f"{url}/#text")
    page.wait_for_selector("html[data-ready=yes]")
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 1")
    page.fill("#prompt", "And God said,")
    page.fill("#p-max_new_tokens", "128")
    page.fill("#p-seed", "11")
    gate.pause_when = lambda e: e.get("type") == "step" and e["canvas"] == 1 and e["step"] == 12
    page.click("#text-run")
    page.wait_for_function("() => document.getElementById('text-timeline-label').textContent"
                           ".startsWith('step 12 of canvas 2')")
    shoot(page, out / "text-denoising.png")
    gate.release()
    page.wait_for_selector("#text-status[data-state=done]", timeout=60_000)
    shoot(page, out / "text-done.png")


def sudoku_mode(page, gate: Gate, url: str, out: Path) -> None:
    page.goto(f"{url}/#sudoku")
    page.wait_for_selector("html[data-ready=yes]")
    page.select_option("#sudoku-example", value="2")  # Easy A
    page.fill("#attempts", "16")
    page.fill("#sudoku-seed", "1")
    steps = {"n": 0}

    def mid(event: dict) -> bool:
        steps["n"] += event.get("type") == "step"
        return steps["n"] >= 16 * 7  # about the 7th step of every attempt

    gate.pause_when = mid
    page.click("#sudoku-run")
    page.wait_for_function("() => document.getElementById('sudoku-timeline-label').textContent.startsWith('step 7')")
    shoot(page, out / "sudoku-denoising.png")
    gate.release()
    page.wait_for_selector("#sudoku-verdict:not([hidden])", timeout=60_000)
    shoot(page, out / "sudoku-solved.png")

    # a hard puzzle, few attempts: the verdict is often "not valid", and the page says so
    page.select_option("#sudoku-example", value="6")  # Expert A
    page.fill("#attempts", "2")
    page.fill("#sudoku-seed", "3")
    page.click("#sudoku-run")
    page.wait_for_selector("#sudoku-verdict:not([hidden])", timeout=60_000)
    shoot(page, out / "sudoku-not-solved.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="a running service that serves / ")
    parser.add_argument("--api-key", help="when the service has DG_API_KEYS")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=860)
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    url = args.url.rstrip("/")
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": args.width, "height": args.height},
                                      color_scheme="light", reduced_motion="reduce")
        if args.api_key:
            context.add_init_script(f"localStorage.setItem('dgserve.apiKey', {json.dumps(args.api_key)})")
        page = context.new_page()
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        gate = Gate()
        page.route_web_socket(re.compile(r"/ws/generate"), gate.route)
        text_mode(page, gate, url, args.out)
        sudoku_mode(page, gate, url, args.out)
        browser.close()
    if errors:
        print("errors in the page:", *errors, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
