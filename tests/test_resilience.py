"""Nothing accepted is ever lost: worker crashes, Redis restarts, disconnects, overload, shutdown, access
control. Real processes, a real Redis server; each test prints its tally (lost must be 0)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from dataclasses import dataclass, field

import httpx
import pytest
import redis
import websockets
from prometheus_client.parser import text_string_to_metric_families

from protocol import contract
from tests.procs import Service

pytestmark = pytest.mark.slow

LONG = {"max_new_tokens": 64, "max_denoising_steps": 150}  # 2 canvases x 150 steps: seconds on a CPU


@dataclass
class Tally:
    name: str
    accepted: int = 0
    completed: int = 0
    errored: int = 0
    rejected: int = 0
    finals: dict[str, list[str]] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.accepted - self.completed - self.errored

    def report(self) -> None:
        print(f"\n[{self.name}] accepted {self.accepted} / completed {self.completed} / errored {self.errored} / "
              f"lost {self.lost} (rejected before acceptance: {self.rejected})")


async def ws_request(url: str, body: dict, events: list[dict], close_after_steps: int | None = None) -> None:
    """One request over its own WebSocket; every event appended to `events`."""
    async with websockets.connect(url, max_size=None, open_timeout=30) as ws:
        await ws.send(json.dumps({"type": "generate", **body}))
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), timeout=180))
            events.append(event)
            if close_after_steps is not None and sum(e["type"] == "step" for e in events) >= close_after_steps:
                return  # leaving mid-canvas: the connection closes under the request
            if event["type"] in ("done", "error"):
                return


def check_clean_stream(events: list[dict]) -> None:
    """After the last `restarted`, the steps are exactly (0, 1), (0, 2), ...: none duplicated, none mixed."""
    last_restart = max((i for i, e in enumerate(events) if e["type"] == "restarted"), default=-1)
    expected = {}
    for e in events[last_restart + 1:]:
        if e["type"] == "step":
            assert e["step"] == expected.get(e["canvas"], 0) + 1, (e["canvas"], e["step"], expected)
            expected[e["canvas"]] = e["step"]


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@pytest.fixture
def svc(tiny_checkpoint, tmp_path):
    services: list[Service] = []

    def make(**gateway_env: str) -> Service:
        s = Service({"tiny": tiny_checkpoint}, tmp_path, gateway_env=gateway_env or None)
        services.append(s)
        return s

    yield make
    for s in services:
        s.close()


def test_kill9_worker_with_20_in_flight_loses_nothing(svc):
    s = svc()
    s.start_gateway()
    workers = [s.start_worker("tiny", max_batch=20, lease_ms=2000, heartbeat_interval_s=0.5) for _ in range(2)]
    s.wait_ready()
    r = redis.Redis.from_url(s.redis.url)
    tally = Tally("kill -9 a worker, 20 requests in flight")

    async def scenario() -> list[list[dict]]:
        streams: list[list[dict]] = [[] for _ in range(20)]
        tasks = [asyncio.create_task(ws_request(s.ws_url, {"prompt": f"request {i}", "seed": i, **LONG}, ev))
                 for i, ev in enumerate(streams)]
        while sum(any(e["type"] == "step" for e in ev) for ev in streams) < 20:  # all 20 running
            await asyncio.sleep(0.1)
        owners = {ev[0]["request_id"]: (r.hget(contract.request_key(ev[0]["request_id"]), "worker") or b"").decode()
                  for ev in streams}
        victim = max(workers, key=lambda w: sum(o == w_id(w) for o in owners.values()))
        victims = [rid for rid, o in owners.items() if o == w_id(victim)]
        assert victims, owners
        victim.kill9()
        print(f"killed {w_id(victim)} holding {len(victims)} of 20 requests")
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=240)
        return streams, victims

    def w_id(w) -> str:
        return f"w{s.workers.index(w) + 1}-tiny"

    streams, victims = asyncio.run(scenario())
    tally.accepted = 20
    for ev in streams:
        finals = [e for e in ev if e["type"] in ("done", "error")]
        assert len(finals) == 1, finals  # each ends exactly once
        tally.completed += finals[0]["type"] == "done"
        tally.errored += finals[0]["type"] == "error"
        check_clean_stream(ev)
    restarted = {ev[0]["request_id"] for ev in streams if any(e["type"] == "restarted" for e in ev)}
    tally.report()
    assert set(victims) <= restarted  # the dead worker's requests restarted on the live one, cleanly
    assert tally.lost == 0 and tally.completed == 20


def test_redis_stops_for_5_seconds_and_comes_back(svc):
    s = svc(DG_RETRY_AFTER_S="1")
    worker = s.up("tiny", max_batch=8, lease_ms=3000, heartbeat_interval_s=0.5)
    tally = Tally("Redis down 5 s under load (AOF restart)")
    unavailable: list[str | None] = []
    sent_after_back: list[int] = []  # 503s to requests sent once Redis was back (must stay empty)
    back_at = float("inf")
    stop = asyncio.Event()

    async def client(i: int, http: httpx.AsyncClient) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            sent = time.monotonic()
            try:
                resp = await http.post("/generate", json={"prompt": f"c{i} r{n}", "seed": n, "max_new_tokens": 32,
                                                          "max_denoising_steps": 12})
            except httpx.HTTPError:
                tally.rejected += 1  # no answer at all: never accepted (counted, must stay rare)
                await asyncio.sleep(0.2)
                continue
            if resp.status_code == 503:
                unavailable.append(resp.headers.get("retry-after"))
                if sent > back_at:
                    sent_after_back.append(n)
                tally.rejected += 1
                await asyncio.sleep(0.2)
            elif resp.status_code == 200:
                tally.accepted += 1
                tally.completed += 1
            else:
                tally.accepted += 1
                tally.errored += 1
                print("unexpected", resp.status_code, resp.text[:200])

    async def scenario() -> None:
        nonlocal back_at
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as http:
            tasks = [asyncio.create_task(client(i, http)) for i in range(6)]
            await asyncio.sleep(3)
            s.redis.stop()  # SIGTERM: Redis writes its AOF and exits
            for i in range(3):  # a new request while Redis is down: 503 with Retry-After
                await asyncio.sleep(1)
                probe = await http.post("/generate", json={"prompt": f"probe {i}", "max_new_tokens": 8})
                assert probe.status_code == 503, probe.text
                unavailable.append(probe.headers.get("retry-after"))
            await asyncio.sleep(2)
            s.redis.start()  # returns once it answers
            back_at = time.monotonic()
            await asyncio.sleep(6)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=180)

    asyncio.run(scenario())
    tally.report()
    print(f"503 answers: {len(unavailable)}, to requests sent after Redis came back: {len(sent_after_back)}")
    assert unavailable and all(v == "1" for v in unavailable)  # 503 with Retry-After while down
    # none for a request sent once Redis is back (one sent just before may still exhaust its retries and get a 503)
    assert not sent_after_back
    assert tally.errored == 0 and tally.lost == 0
    assert s.gateway.alive() and worker.alive()  # recovered without restarts
    done_after = httpx.post(s.url + "/generate", json={"prompt": "after", "max_new_tokens": 16}, timeout=60)
    assert done_after.status_code == 200


def test_50_websocket_clients_leave_mid_canvas(svc):
    s = svc()
    worker = s.up("tiny", max_batch=64)
    tally = Tally("50 WebSocket clients disconnect mid-canvas")

    async def scenario():
        leavers = [[] for _ in range(50)]
        stayers = [[] for _ in range(5)]
        tasks = [ws_request(s.ws_url, {"prompt": f"leave {i}", "seed": i, "max_denoising_steps": 900}, ev,
                            close_after_steps=1) for i, ev in enumerate(leavers)]
        tasks += [ws_request(s.ws_url, {"prompt": f"stay {i}", "seed": i, "max_new_tokens": 64,
                                        "max_denoising_steps": 40}, ev) for i, ev in enumerate(stayers)]
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=240)
        return leavers, stayers

    leavers, stayers = asyncio.run(scenario())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = s.worker_metrics(worker)
        cancelled = metric(text, "dgserve:request_failure_total", reason="cancelled")
        running = metric(text, "dgserve:num_requests_running")
        if cancelled >= 50 and running == 0:
            break
        time.sleep(0.5)
    print(f"worker: {cancelled:.0f} requests cancelled, {running:.0f} still running")
    tally.accepted = 55
    tally.errored = int(cancelled)
    tally.completed = sum(ev[-1]["type"] == "done" for ev in stayers)
    tally.report()
    assert cancelled == 50 and running == 0  # every leaver's row left the batch
    assert tally.completed == 5 and tally.lost == 0  # the others were unaffected


def test_overload_gets_429_quickly_and_the_accepted_all_complete(svc):
    s = svc(DG_MAX_QUEUE_DEPTH="4", DG_RETRY_AFTER_S="3")
    s.up("tiny", max_batch=2)
    tally = Tally("10x the queue depth at once")
    refused_in: list[float] = []

    async def one(http: httpx.AsyncClient, i: int) -> None:
        t = time.perf_counter()
        resp = await http.post("/generate", json={"prompt": f"load {i}", "seed": i, "max_new_tokens": 32,
                                                  "max_denoising_steps": 20})
        if resp.status_code == 429:
            refused_in.append(time.perf_counter() - t)
            assert resp.headers["retry-after"] == "3" and "overloaded" in resp.text
            tally.rejected += 1
        else:
            tally.accepted += 1
            tally.completed += resp.status_code == 200
            tally.errored += resp.status_code != 200

    async def scenario():
        async with httpx.AsyncClient(base_url=s.url, timeout=120) as http:
            await asyncio.gather(*(one(http, i) for i in range(40)))

    asyncio.run(scenario())
    tally.report()
    assert tally.rejected >= 25  # depth 4 + 2 running: the excess is refused
    assert max(refused_in) < 2.0  # quickly, not after waiting
    assert tally.completed == tally.accepted and tally.lost == 0


def test_a_request_queued_past_its_deadline_times_out(svc, tiny_checkpoint):
    s = svc(DG_REQUEST_TIMEOUT_S="1")
    s.start_gateway()
    s.wait_gateway()  # no worker serves the model yet
    t = time.perf_counter()
    resp = httpx.post(s.url + "/generate", json={"prompt": "late"}, timeout=30)
    assert resp.status_code == 504 and resp.json()["code"] == "timeout", resp.text
    assert time.perf_counter() - t < 5
    rid = resp.json()["request_id"]
    worker = s.start_worker("tiny")
    s.wait_ready()
    time.sleep(1.5)  # the worker sees the ended request and skips it: nothing runs late
    r = redis.Redis.from_url(s.redis.url)
    kinds = [json.loads(f[b"e"])["type"] for _, f in r.xrange(contract.events_key(rid))]
    assert kinds == ["queued", "error"]
    assert worker.alive()


def test_idempotency_key_returns_the_same_request(svc):
    s = svc()
    s.up("tiny")
    body = {"prompt": "once", "seed": 1, "max_new_tokens": 16}
    a = httpx.post(s.url + "/generate", json=body, headers={"Idempotency-Key": "k-123"}, timeout=60).json()
    b = httpx.post(s.url + "/generate", json=body, headers={"Idempotency-Key": "k-123"}, timeout=60).json()
    c = httpx.post(s.url + "/generate", json=body, headers={"Idempotency-Key": "k-456"}, timeout=60).json()
    assert a["request_id"] == b["request_id"] != c["request_id"]
    assert a["token_ids"] == b["token_ids"]


def test_attempts_exhausted_go_to_the_dead_letter_stream(svc):
    s = svc()
    first = s.up("tiny", lease_ms=1500, heartbeat_interval_s=0.5)

    async def scenario():
        events: list[dict] = []
        task = asyncio.create_task(ws_request(s.ws_url, {"prompt": "doomed", **LONG}, events))
        while not any(e["type"] == "step" for e in events):
            await asyncio.sleep(0.05)
        first.kill9()
        s.start_worker("tiny", lease_ms=1500, heartbeat_interval_s=0.5, max_attempts=1)
        await asyncio.wait_for(task, timeout=120)
        return events

    events = asyncio.run(scenario())
    assert events[-1]["type"] == "error" and events[-1]["code"] == "attempts_exhausted", events[-1]
    r = redis.Redis.from_url(s.redis.url)
    dead = r.xrange(contract.DEADLETTER)
    assert len(dead) == 1 and json.loads(dead[0][1][b"job"])["request_id"] == events[0]["request_id"]


def test_sigterm_drains_a_worker_and_it_exits_0(svc):
    s = svc()
    worker = s.up("tiny", drain_timeout_s=60)

    async def scenario():
        streams = [[] for _ in range(4)]
        tasks = [asyncio.create_task(ws_request(s.ws_url, {"prompt": f"drain {i}", "seed": i, "max_new_tokens": 32,
                                                           "max_denoising_steps": 60}, ev))
                 for i, ev in enumerate(streams)]
        while sum(any(e["type"] == "step" for e in ev) for ev in streams) < 4:
            await asyncio.sleep(0.05)
        worker.signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        return streams

    streams = asyncio.run(scenario())
    assert all(ev[-1]["type"] == "done" for ev in streams)  # what it held, it finished
    assert worker.proc.wait(timeout=30) == 0


def test_sigterm_on_the_gateway_closes_websockets_with_1001(svc):
    s = svc()
    s.up("tiny")

    async def scenario():
        async with websockets.connect(s.ws_url) as ws:
            await ws.send(json.dumps({"type": "generate", "prompt": "bye", "max_denoising_steps": 900}))
            await ws.recv()
            s.gateway.signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), timeout=30)
            return closed.value.rcvd.code

    assert asyncio.run(scenario()) == 1001


def test_api_keys_on_http_and_websocket(svc):
    s = svc(DG_API_KEYS="key-one,key-two")
    s.up("tiny")
    body = {"prompt": "secret", "max_new_tokens": 8}
    codes = [httpx.post(s.url + "/generate", json=body, headers=h, timeout=60).status_code
             for h in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer key-two"})]
    print(f"\nHTTP without / wrong / right key: {codes}")
    assert codes == [401, 401, 200]
    openai_codes = [httpx.get(s.url + "/v1/models", headers=h).status_code
                    for h in ({}, {"Authorization": "Bearer key-one"})]
    assert openai_codes == [401, 200]

    async def ws_code(url: str, headers: dict | None = None) -> int:
        try:
            async with websockets.connect(url, additional_headers=headers) as ws:
                await ws.send(json.dumps({"type": "generate", **body}))
                while json.loads(await ws.recv())["type"] not in ("done", "error"):
                    pass
                return 200
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    ws_codes = [asyncio.run(ws_code(s.ws_url)), asyncio.run(ws_code(s.ws_url + "?api_key=nope")),
                asyncio.run(ws_code(s.ws_url + "?api_key=key-one")),
                asyncio.run(ws_code(s.ws_url, {"Authorization": "Bearer key-two"}))]
    print(f"WebSocket without / wrong / right (query) / right (header) key: {ws_codes}")
    assert ws_codes == [401, 401, 200, 200]
    log = s.gateway.log()
    assert "key-one" not in log and "key-two" not in log  # keys are never logged


def test_oversized_and_malformed_websocket_frames(svc):
    s = svc(DG_MAX_WS_MESSAGE_BYTES="65536")
    s.up("tiny")

    async def scenario():
        async with websockets.connect(s.ws_url, max_size=None) as ws:
            await ws.send(b"\xff\xfe not utf-8 \x00")
            first = json.loads(await ws.recv())
            await ws.send("x" * 200_000)  # over the limit: a policy close (1009), never a crash
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), timeout=10)
        return first, closed.value.rcvd.code

    first, code = asyncio.run(scenario())
    assert first["type"] == "error" and first["code"] in ("invalid_json", "invalid_message")
    assert code == 1009
    assert httpx.post(s.url + "/generate", json={"prompt": "fine", "max_new_tokens": 8}, timeout=60).status_code == 200


def test_oversized_http_body_gets_413(svc):
    s = svc(DG_MAX_BODY_BYTES="2048")
    s.up("tiny")
    resp = httpx.post(s.url + "/generate", json={"prompt": "x" * 5000}, timeout=30)
    assert resp.status_code == 413 and "2048" in resp.json()["detail"]


def test_sigterm_past_the_grace_period_hands_requests_back(svc):
    s = svc()
    first = s.up("tiny", drain_timeout_s=1, lease_ms=2000, heartbeat_interval_s=0.5)

    async def scenario():
        events: list[dict] = []
        task = asyncio.create_task(ws_request(s.ws_url, {"prompt": "hand me back", "seed": 3, **LONG}, events))
        while not any(e["type"] == "step" for e in events):
            await asyncio.sleep(0.05)
        first.signal(signal.SIGTERM)  # 300 steps cannot finish within the 1 s grace period
        await asyncio.get_running_loop().run_in_executor(None, first.proc.wait, 30)
        s.start_worker("tiny", lease_ms=2000, heartbeat_interval_s=0.5)
        await asyncio.wait_for(task, timeout=180)
        return events

    events = asyncio.run(scenario())
    assert first.proc.returncode == 0
    kinds = [e["type"] for e in events]
    assert kinds.count("restarted") == 1 and kinds[-1] == "done" and kinds.count("done") == 1
    check_clean_stream(events)
