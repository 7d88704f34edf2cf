"""Smoke test of the serving benchmark (bench/serve.py): tiny settings, real processes, the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.serving.workload import build_workload

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "serve.py"


def test_prompts_have_the_requested_number_of_tokens(tiny_checkpoint):
    from service.registry import load_model

    served = load_model("bench", str(tiny_checkpoint))
    args = type("Args", (), dict(clients=3, requests_per_client=2, prompt_tokens=40, max_new_tokens=64, steps=4,
                                 seed=5))
    reqs = build_workload(served, args)
    assert len(reqs) == 6 and len({r.ref for r in reqs}) == 6 and len({r.seed for r in reqs}) == 6
    for r in reqs:  # what the gateway makes of the text is what the engine mode is given
        assert served.encode_prompt(r.prompt) == r.prompt_ids
        assert len(r.prompt_ids) == 40


def test_serve_benchmark_smoke(tiny_checkpoint, tmp_path):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(SCRIPT), "--checkpoint", str(tiny_checkpoint), "--clients", "2",
           "--requests-per-client", "1", "--prompt-tokens", "12", "--max-new-tokens", "40", "--steps", "3",
           "--repeats", "1", "--warmup", "0", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0

    assert {"benchmark", "device", "checkpoint", "settings", "modes", "ratios", "same_tokens", "analysis",
            "requests"} <= set(data)
    assert data["settings"]["clients"] == 2 and data["settings"]["steps"] == 3
    for mode in ("service", "engine"):
        s = data["modes"][mode]
        assert s["requests"] == s["completed"] == 2 and not s["errors"], s
        assert s["completion_tokens"] > 0 and s["tok_s"] > 0 and s["wall_s"] > 0
        steps = s["step_events"]
        assert steps["expected"] > 0 and steps["received"] == steps["expected"] and steps["missing"] == 0, steps
        assert not steps["requests_with_missing"] and not steps["out_of_order"]
        for key in ("first_step_s", "step_interval_s", "first_canvas_s", "e2e_s"):
            assert {"p50", "p90", "p99"} <= set(s[key]), (mode, key, s[key])
        assert s[mode if mode == "engine" else "worker"]["steps"] > 0
    assert data["modes"]["service"]["queued_s"]["n"] == 2
    diagnostic = data["modes"]["engine+publisher"]  # the worker's publisher beside the engine, through its public API
    assert diagnostic["completed"] == 2 and diagnostic["publisher"]["batches"] > 0, diagnostic
    assert data["ratios"]["tok_s_service_over_engine"] > 0
    assert data["same_tokens"]["all_identical"], data["same_tokens"]
    assert data["prompt_tokens_agree"]
    for rec in data["requests"]["service"]:
        assert rec["error"] is None and rec["steps_received"] == rec["steps_expected"]
        assert len(rec["step_gaps_s"]) == rec["steps_received"] - 1
        assert rec["queued_s"] <= rec["first_step_s"] <= rec["first_canvas_s"] <= rec["e2e_s"]
