"""The whole path through real processes: a real Redis, the gateway under uvicorn, a CPU worker,
real httpx and `websockets` clients."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets


async def ws_request(url: str, body: dict, cancel_after_steps: int | None = None) -> list[dict]:
    """Send one generate message; collect every event of that request until its final one."""
    events: list[dict] = []
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "generate", **body}))
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), timeout=60))
            events.append(event)
            steps = sum(e["type"] == "step" for e in events)
            if cancel_after_steps is not None and steps == cancel_after_steps:
                await ws.send(json.dumps({"type": "cancel", "request_id": event["request_id"]}))
            if event["type"] in ("done", "error"):
                return events


def test_post_generate_returns_text(service):
    r = httpx.post(service.url + "/generate", json={"prompt": "The quick brown fox", "seed": 3}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"request_id", "text", "token_ids", "finish_reason", "usage"}
    assert body["text"] and body["token_ids"]
    assert body["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] == len(body["token_ids"])
    assert usage["prompt_tokens"] > 0 and usage["denoising_steps"] >= usage["canvases"] >= 1
    assert usage["tokens_per_forward"] == pytest.approx(usage["completion_tokens"] / usage["denoising_steps"],
                                                         abs=1e-3)


def test_messages_use_the_chat_template(service):
    r = httpx.post(service.url + "/generate", json={"messages": [{"role": "user", "content": "hello"}],
                                                    "seed": 1, "max_new_tokens": 16}, timeout=60)
    assert r.status_code == 200, r.text
    # <bos> <start_of_turn> user \n hello <end_of_turn> \n <start_of_turn> model \n: longer than the plain prompt
    plain = httpx.post(service.url + "/generate", json={"prompt": "hello", "seed": 1, "max_new_tokens": 16},
                       timeout=60).json()
    assert r.json()["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 4


async def test_websocket_streams_every_step_and_canvases_add_up(service):
    events = await ws_request(service.ws_url, {"prompt": "In the beginning", "seed": 7, "max_new_tokens": 96,
                                               "max_denoising_steps": 6})
    kinds = [e["type"] for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "done", kinds
    done = events[-1]
    steps = [e for e in events if e["type"] == "step"]
    canvases = [e for e in events if e["type"] == "canvas"]
    # one step event per denoising step of every canvas, numbered 1.. within each canvas
    assert len(steps) == done["usage"]["denoising_steps"]
    assert len(canvases) == done["usage"]["canvases"]
    for c in canvases:
        numbers = [s["step"] for s in steps if s["canvas"] == c["canvas"]]
        assert numbers == list(range(1, c["steps"] + 1))
    for s in steps:
        assert len(s["draft_ids"]) == 32 and isinstance(s["draft_text"], str)
        assert 1 <= s["accepted"] <= 32 and s["mean_entropy"] >= 0
        # per-position views: each position's token text, whether it was kept, its entropy
        assert len(s["draft_tokens"]) == len(s["accepted_mask"]) == len(s["entropy"]) == 32
        assert sum(s["accepted_mask"]) == s["accepted"]
        assert abs(sum(s["entropy"]) / 32 - s["mean_entropy"]) < 1e-3
    # the last step of each canvas drafted what the canvas committed
    for c in canvases:
        last = [s for s in steps if s["canvas"] == c["canvas"]][-1]
        assert last["draft_ids"][: len(c["token_ids"])] == c["token_ids"]
    assert "".join(c["text"] for c in canvases) == done["text"]
    assert sum((c["token_ids"] for c in canvases), []) == done["token_ids"]


async def test_post_and_websocket_give_the_same_tokens_for_a_seed(service):
    body = {"prompt": "Sphinx of black quartz", "seed": 1234, "max_new_tokens": 64}
    post = httpx.post(service.url + "/generate", json=body, timeout=60).json()
    events = await ws_request(service.ws_url, body)
    assert events[-1]["type"] == "done"
    assert events[-1]["token_ids"] == post["token_ids"]
    assert events[-1]["text"] == post["text"]


async def test_cancel_stops_a_request_mid_canvas(service):
    # an untrained model never gets confident: 500 steps would run in full without the cancel
    events = await ws_request(service.ws_url, {"prompt": "cancel me", "seed": 5, "max_denoising_steps": 500},
                              cancel_after_steps=3)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "cancelled"
    steps = [e for e in events if e["type"] == "step"]
    assert 3 <= len(steps) < 40, len(steps)  # left within a few steps, well before the canvas ended
    assert not any(e["type"] == "canvas" for e in events)
    # the service is healthy afterwards
    r = httpx.post(service.url + "/generate", json={"prompt": "still alive", "max_new_tokens": 8}, timeout=60)
    assert r.status_code == 200


async def test_several_requests_share_one_connection(service):
    async with websockets.connect(service.ws_url) as ws:
        for i in range(3):
            await ws.send(json.dumps({"type": "generate", "prompt": f"request {i}", "seed": i,
                                      "max_new_tokens": 32, "ref": f"r{i}"}))
        refs, finals = {}, {}
        while len(finals) < 3:
            event = json.loads(await asyncio.wait_for(ws.recv(), timeout=60))
            if event["type"] == "queued":
                refs[event["ref"]] = event["request_id"]
            if event["type"] in ("done", "error"):
                finals[event["request_id"]] = event
    assert sorted(refs) == ["r0", "r1", "r2"]
    assert set(finals) == set(refs.values())
    assert all(e["type"] == "done" for e in finals.values())


@pytest.mark.parametrize("body, field, words", [
    ({"prompt": ""}, "prompt", "at least 1"),
    ({"prompt": "x", "bogus": 1}, "bogus", "Extra inputs"),
    ({"prompt": "x", "max_denoising_steps": 0}, "max_denoising_steps", "greater than or equal to 1"),
    ({"prompt": "x", "max_denoising_steps": 5000}, "max_denoising_steps", "less than or equal to 1000"),
    ({"prompt": "x", "entropy_bound": -1}, "entropy_bound", "greater than 0"),
    ({"prompt": "x", "t_min": 0.9, "t_max": 0.5}, "body", "t_max"),
    ({"prompt": "x", "max_new_tokens": 999999}, "max_new_tokens", "less than or equal to 4096"),
    ({"prompt": "word " * 5000}, "prompt", "the limit is 4096"),
    ({"prompt": "x", "model": "nope"}, "model", "unknown model"),
    ({}, "body", "exactly one of"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "body", "exactly one of"),
])
def test_bad_input_gets_422_naming_the_field_and_limit(service, body, field, words):
    r = httpx.post(service.url + "/generate", json=body, timeout=30)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(field in [str(p) for p in d["loc"]] and words in d["msg"] for d in detail), detail
    assert "Traceback" not in r.text


def test_malformed_json_body_is_a_422_not_a_crash(service):
    r = httpx.post(service.url + "/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert httpx.get(service.url + "/healthz").status_code == 200


async def test_malformed_websocket_messages_get_error_events_and_the_connection_lives(service):
    async with websockets.connect(service.ws_url) as ws:
        for raw, code in [("{oops", "invalid_json"), ("[1,2]", "invalid_message"),
                          (json.dumps({"type": "dance"}), "invalid_message"),
                          (json.dumps({"type": "generate", "prompt": "x", "t_min": -1}), "validation_error"),
                          (json.dumps({"type": "generate", "prompt": "x", "max_new_tokens": 10**6}),
                           "validation_error")]:
            await ws.send(raw)
            event = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
            assert event["type"] == "error" and event["code"] == code, event
            assert "Traceback" not in event["message"]
        event_texts = []
        await ws.send(json.dumps({"type": "generate", "prompt": "x", "t_min": -1}))
        event_texts.append(json.loads(await ws.recv())["message"])
        assert "t_min" in event_texts[0] and "greater than or equal to 0" in event_texts[0]
        # the same connection still serves a valid request
        await ws.send(json.dumps({"type": "generate", "prompt": "fine", "max_new_tokens": 8}))
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), timeout=60))
            if event["type"] in ("done", "error"):
                break
        assert event["type"] == "done"


async def test_websocket_errors_name_each_field(service):
    """A refused message's `errors` lists every offending field with its message: clients read it, never the
    prose of `message` (which says the same for a person)."""
    async with websockets.connect(service.ws_url) as ws:
        await ws.send(json.dumps({"type": "generate", "prompt": "x", "t_min": -1, "max_denoising_steps": 0,
                                  "ref": "two"}))
        event = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
        assert event["type"] == "error" and event["code"] == "validation_error" and event["request_id"] is None
        assert event["ref"] == "two"
        fields = {e["field"]: e["message"] for e in event["errors"]}
        assert set(fields) == {"t_min", "max_denoising_steps"}, event
        assert "greater than or equal to 0" in fields["t_min"]
        assert all(f"{name}: {text}" in event["message"] for name, text in fields.items())
        # the rule that needs the checkpoint's defaults names its field too
        await ws.send(json.dumps({"type": "generate", "prompt": "x", "t_max": 0.3}))  # the default t_min is 0.4
        event = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
        assert [e["field"] for e in event["errors"]] == ["t_max"] and "t_min" in event["errors"][0]["message"]
        for raw, field in [(json.dumps({"type": "dance"}), "type"), ("[1]", None), ("{oops", None),
                           (json.dumps({"type": "cancel", "request_id": "nope"}), "request_id")]:
            await ws.send(raw)
            event = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
            assert [e["field"] for e in event["errors"]] == [field], event
            assert event["errors"][0]["message"] in event["message"]


def _finished(url: str) -> float:
    """Requests the gateway saw reach their final event, over every outcome."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    return sum(s.value for s in families["dgserve:gateway_request_finished"].samples if s.name.endswith("_total"))


async def test_every_route_follows_its_requests_through_one_path(service):
    """POST /generate, a WebSocket request and an OpenAI stream are each followed to the end by the gateway's one
    path, which counts each request once in its metrics (a WebSocket or streamed request was not counted)."""
    body = {"prompt": "count me", "max_new_tokens": 8, "max_denoising_steps": 2, "seed": 1}
    before = _finished(service.url)
    assert httpx.post(service.url + "/generate", json=body, timeout=60).status_code == 200
    assert _finished(service.url) == before + 1
    events = await ws_request(service.ws_url, body)
    assert events[-1]["type"] == "done" and _finished(service.url) == before + 2
    with httpx.stream("POST", service.url + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "count me", "max_tokens": 8, "max_denoising_steps": 2,
                            "n": 2, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]" and _finished(service.url) == before + 4
