"""The worker's runner in this process (real engine, real Redis, the gateway's broker submitting): what it
publishes for a request whose stop string is found, and the settings a worker starts with."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from protocol import contract
from tests.test_adversarial import inprocess_job, inprocess_runner

REPO = Path(__file__).resolve().parents[1]


def run_jobs(url: str, jobs: list[contract.Job]) -> list[list[contract.Queued | contract.Step | contract.Canvas |
                                                         contract.Done | contract.Error]]:
    """Submit each job in turn (the next after the previous one's final event); every event of each."""
    from service.broker import Broker

    async def scenario() -> list[list]:
        broker = Broker(url)
        try:
            out = []
            for job in jobs:
                await broker.submit(job, tenant="t", max_depth=10)
                out.append([raw.parse() async for _, raw in broker.events(job.request_id)])
            return out
        finally:
            await broker.close()

    return asyncio.run(asyncio.wait_for(scenario(), timeout=120))


def test_a_stop_string_across_a_canvas_boundary_ends_the_request_through_the_engine(tiny_model, tmp_path):
    """A stop string that begins in one canvas and ends in the next: no canvas ever carries its first half, so the
    canvases' texts add up to the final text, which ends where the stop string begins; the request ends as
    `stop_string` with the tokens that text keeps, and nothing of the canvases after it is published."""
    model, tokenizer = tiny_model
    sampling = dict(max_new_tokens=96, max_denoising_steps=3, seed=7)  # 3 canvases of 32, no EOS
    with inprocess_runner(model, tokenizer, tmp_path) as url:
        [plain] = run_jobs(url, [inprocess_job(tokenizer, "plain", **sampling)])
        canvases = [e.text for e in plain if e.type == "canvas"]
        full, first = plain[-1].text, len(canvases[0])
        stop = full[first - 2: first + 2]
        assert len(canvases) == 3 and first >= 2 and len(canvases[1]) >= 2 and full.find(stop) == first - 2
        job = inprocess_job(tokenizer, "stopped", **sampling).model_copy(update={"stop": [stop]})
        [stopped] = run_jobs(url, [job])
    done = stopped[-1]
    assert done.type == "done" and done.finish_reason == "stop_string", done
    sent = [e.text for e in stopped if e.type == "canvas"]
    assert "".join(sent) == done.text == full[: first - 2], (sent, done.text, full)
    assert [e.canvas for e in stopped if e.type == "step"] == [0] * 3 + [1] * 3  # nothing of canvas 2
    kept = done.token_ids
    assert kept == plain[-1].token_ids[: len(kept)] and 0 < len(kept) <= 32  # the text ends in canvas 0
    text_of = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert text_of(kept).startswith(done.text) and not text_of(kept[:-1]).startswith(done.text)
    assert done.usage.completion_tokens == len(kept) and done.usage.canvases >= 2  # what ran: the engine may be ahead


@pytest.mark.parametrize("variable, named", [("DG_SAMPLERR", "DG_SAMPLER"), ("DG_EXPERTS_IMPLEMENTATION", None)])
def test_a_dg_variable_no_process_reads_stops_the_worker_at_start_up(variable, named, tmp_path):
    """A typo, or a setting that is gone, is one line naming it and exit status 2: no traceback, no model loaded."""
    env = {"PATH": "/usr/bin:/bin", variable: "x", "DG_METRICS_PORT": "0", "REDIS_URL": "redis://127.0.0.1:1/0"}
    proc = subprocess.run([sys.executable, "-m", "dgserve", "worker"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert variable in proc.stderr and "Traceback" not in proc.stderr + proc.stdout
    assert (f"did you mean {named}?" in proc.stderr) if named else "did you mean" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_dg_sampler_reaches_the_worker_s_engine(tiny_checkpoint, tmp_path):
    """README's DG_SAMPLER=exact is a worker setting the engine is built with (it was silently ignored)."""
    import time

    from tests.procs import Service

    with Service({"tiny": tiny_checkpoint}, tmp_path) as svc:
        worker = svc.start_worker("tiny", sampler="exact")
        deadline = time.monotonic() + 120
        while "engine ready" not in worker.log() and worker.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        [ready] = [line for line in worker.log().splitlines() if "engine ready" in line]
    assert "sampler=exact" in ready, ready
