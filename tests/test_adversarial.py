"""The service against a determined adversary (issue 14): every hole found in a black-box attack, kept closed.

One service for the module (a real Redis with AOF, the gateway, one CPU worker; API keys k1 and k2), attacked
through real HTTP, WebSocket and `openai` clients. Every input goes through `Attack`, whose tally the module
prints at the end: inputs tried, 4xx, 5xx (must be 0), connections dropped (must be 0), requests lost or
duplicated (must be 0), and whether the worker was alive after each test (each test is a batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import json
import socket
import string
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import redis
import websockets

from protocol import contract
from tests.procs import Service

pytestmark = pytest.mark.slow

K1, K2 = "k1-adversarial-key", "k2-adversarial-key"
AUTH1, AUTH2 = {"Authorization": f"Bearer {K1}"}, {"Authorization": f"Bearer {K2}"}
PUZZLE = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"
# an untrained model never gets confident: these run their whole step budget (many seconds) unless cancelled
SLOW = {"max_denoising_steps": 300, "confidence_threshold": 1e-9}
STEP_BUDGET = 200  # the module's running deadline (DG_MAX_REQUEST_STEPS): more than one SLOW canvas
READ_TIMEOUT_S = 1.5  # the module's DG_READ_TIMEOUT_S
CHEAP = {"max_new_tokens": 8, "max_denoising_steps": 2}


@dataclass
class Tally:
    inputs: int = 0
    status: Counter = field(default_factory=Counter)
    dropped: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    alive: list[tuple[str, bool]] = field(default_factory=list)  # (batch, worker and gateway alive after it)

    def answer(self, code: int) -> None:
        self.inputs += 1
        self.status[f"{code // 100}xx"] += 1

    def report(self) -> str:
        return (f"inputs tried {self.inputs}; 2xx {self.status['2xx']}, 4xx {self.status['4xx']}, "
                f"5xx {self.status['5xx']}; connections dropped {len(self.dropped)}; requests lost "
                f"{len(self.lost)}, duplicated {len(self.duplicated)}; worker alive after "
                f"{sum(ok for _, ok in self.alive)} of {len(self.alive)} batches"
                + "".join(f"\n  NOT alive after {name}" for name, ok in self.alive if not ok))


class Attack:
    """The module's service and the clients that attack it; every answer is tallied."""

    def __init__(self, svc: Service, worker, tally: Tally):
        self.svc, self.worker, self.tally = svc, worker, tally
        self.redis = redis.Redis.from_url(svc.redis.url)
        self.http = httpx.Client(base_url=svc.url, timeout=120, headers=AUTH1)  # one keep-alive connection

    def raw(self, method: str, path: str, body: bytes | str = b"", headers: dict | None = None) -> tuple[int, str]:
        """One request on the module's raw keep-alive connection, then a probe on the same connection: a
        server that answered and then dropped it counts as a dropped connection."""
        body = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
        head = {"Content-Type": "application/json", **AUTH1, **(headers or {})}
        answers = []
        conn = http.client.HTTPConnection("127.0.0.1", self.svc.port, timeout=60)
        for m, p, b in ((method, path, body), ("GET", "/healthz", b"")):
            try:
                conn.request(m, p, body=b, headers=head)
                resp = conn.getresponse()
                answers.append((resp.status, resp.read().decode("utf-8", "replace")))
            except (OSError, http.client.HTTPException) as exc:
                self.tally.inputs += 1
                self.tally.dropped.append(f"{method} {path} {body[:60]!r}: {exc!r}")
                conn.close()
                raise AssertionError(f"connection dropped: {exc!r}") from None
        conn.close()
        self.tally.answer(answers[0][0])
        assert answers[1][0] == 200
        return answers[0]

    def post(self, path: str, headers: dict | None = None, **kwargs) -> httpx.Response:
        try:
            resp = self.http.post(path, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            self.tally.inputs += 1
            self.tally.dropped.append(f"POST {path}: {exc!r}")
            raise
        self.tally.answer(resp.status_code)
        return resp

    @staticmethod
    def tenant(key: str) -> str:
        from service.identity import tenant_of

        return tenant_of(key)

    def cancels(self) -> list[str]:
        """Request ids in the broadcast cancel stream, oldest first."""
        return [f[b"request_id"].decode() for _, f in self.redis.xrange(contract.CANCELS)]

    def status(self, rid: str) -> str:
        return (self.redis.hget(contract.request_key(rid), contract.STATUS_FIELD) or b"").decode()

    def final_types(self, rid: str) -> list[str]:
        kinds = [json.loads(f[contract.EVENT_FIELD.encode()])["type"]
                 for _, f in self.redis.xrange(contract.events_key(rid))]
        return [k for k in kinds if k in contract.FINAL_TYPES]


def adversarial_checkpoint(out: Path) -> Path:
    """An untrained DiffusionGemma with one token per printable character and an 81-position canvas, so that
    one model serves /generate, /v1 and /sudoku."""
    from training.checkpoints import char_tokenizer, generation_config, random_model, save_checkpoint, tiny_config

    tok = char_tokenizer(string.digits + string.ascii_letters + string.punctuation + " ")
    model = random_model(tiny_config(vocab_size=len(tok), canvas_length=81), seed=0)
    model.generation_config = generation_config(max_new_tokens=81, max_denoising_steps=8)
    return save_checkpoint(model, tok, out)


@pytest.fixture(scope="module")
def attack(tmp_path_factory) -> Iterator[Attack]:
    root = tmp_path_factory.mktemp("adversarial")
    checkpoint = adversarial_checkpoint(root / "adv")
    env = {"DG_API_KEYS": f"{K1},{K2}", "DG_DEFAULT_MODEL": "adv", "DG_MAX_REQUEST_STEPS": str(STEP_BUDGET),
           "DG_READ_TIMEOUT_S": str(READ_TIMEOUT_S)}
    tally = Tally()
    with Service({"adv": checkpoint}, root, gateway_env=env) as svc:
        worker = svc.up("adv", max_batch=16, lease_ms=2000, heartbeat_interval_s=0.5)
        attack = Attack(svc, worker, tally)
        yield attack
        attack.http.close()
    print(f"\n[adversarial] {tally.report()}")
    assert tally.status["5xx"] == 0 and not tally.dropped, (tally.dropped, tally.status)
    assert not tally.lost and not tally.duplicated, (tally.lost, tally.duplicated)


@pytest.fixture(autouse=True)
def batch(request, attack: Attack) -> Iterator[None]:
    """Each test is a batch of attacks: afterwards the worker and the gateway must still be alive."""
    yield
    alive = attack.worker.alive() and attack.svc.gateway.alive()
    attack.tally.alive.append((request.node.name, alive))
    assert alive, attack.worker.log()[-3000:]


def wait_for(predicate, timeout: float, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    return predicate()


# ----------------------------------------------------------------- 1: leaving cancels
def hang_up_after(seconds: float, call) -> None:
    """Run `call` with a client timeout of `seconds`: the client closes its connection then."""
    with pytest.raises((httpx.TimeoutException, openai.APITimeoutError)):
        call(seconds)


@pytest.mark.parametrize("route", ["generate", "v1", "sudoku"])
def test_a_client_that_hangs_up_cancels_its_request(attack: Attack, route: str):
    """Item 1: a non-streaming request whose client leaves after 1 s is cancelled, not run to `done`."""
    before = len(attack.cancels())
    url = attack.svc.url
    if route == "generate":
        def call(t):
            httpx.post(url + "/generate", json={"prompt": "leave me", "max_new_tokens": 810, **SLOW},
                       headers=AUTH1, timeout=t)
        expected = 1
    elif route == "v1":
        def call(t):
            client = openai.OpenAI(base_url=url + "/v1", api_key=K1, max_retries=0, timeout=t)
            client.completions.create(model="adv", prompt="leave me", max_tokens=810, n=2, extra_body=SLOW)
        expected = 2
    else:
        def call(t):
            httpx.post(url + "/sudoku", json={"puzzle": PUZZLE, "model": "adv", "attempts": 3, "seed": 1,
                                              "max_denoising_steps": 1000, "confidence_threshold": 1e-9},
                       headers=AUTH1, timeout=t)
        expected = 3
    left = time.monotonic()
    hang_up_after(1.0, call)
    attack.tally.inputs += 1
    cancelled = wait_for(lambda: attack.cancels()[before:] if len(attack.cancels()) >= before + expected else None,
                         timeout=5)
    assert cancelled and len(set(cancelled)) == expected, f"no cancel after the client left: {cancelled}"
    ended = wait_for(lambda: all(attack.status(r) == "cancelled" for r in cancelled), timeout=10)
    print(f"\n{route}: {expected} request(s) cancelled {time.monotonic() - left:.1f} s after the client left")
    assert ended, [attack.status(r) for r in cancelled]
    assert all(attack.final_types(r) == ["error"] for r in cancelled)


# ----------------------------------------------------------------- 2: Idempotency-Key scope
def test_idempotency_keys_belong_to_their_caller_and_their_body(attack: Attack):
    """Item 2: k2 reusing k1's Idempotency-Key gets a request of its own, never k1's answer; a key reused with
    another body is a 422 naming `Idempotency-Key`; the same body gets the original answer."""
    mine = {"prompt": "k1 asks this", "seed": 1, "max_new_tokens": 16}
    theirs = {"prompt": "k2 asks that", "seed": 2, "max_new_tokens": 16}
    key = {"Idempotency-Key": "order-42"}
    first = attack.post("/generate", json=mine, headers={**AUTH1, **key})
    other = attack.post("/generate", json=theirs, headers={**AUTH2, **key})
    assert first.status_code == other.status_code == 200, (first.text, other.text)
    assert other.json()["request_id"] != first.json()["request_id"]
    assert other.json()["text"] == attack.post("/generate", json=theirs, headers=AUTH2).json()["text"]
    again = attack.post("/generate", json=mine, headers={**AUTH1, **key})
    assert again.json()["request_id"] == first.json()["request_id"]
    assert again.json()["token_ids"] == first.json()["token_ids"]
    changed = attack.post("/generate", json={**mine, "seed": 9}, headers={**AUTH1, **key})
    assert changed.status_code == 422, changed.text
    assert "Idempotency-Key" in changed.text and "different body" in changed.text
    names = [k.decode() for k in attack.redis.scan_iter(match=contract.PREFIX + ":idem:*")]
    assert len(names) == 2 and not any(K1 in n or K2 in n or "order-42" in n for n in names), names


# ----------------------------------------------------------------- 3: idempotent replay of an expired request
def test_a_replay_whose_events_expired_ends_at_once(attack: Attack):
    """Item 3: an Idempotency-Key lives no longer than its request's events, and a request whose events are gone
    (expired) answers 410 at once instead of waiting forever."""
    body, key = {"prompt": "replay me", "seed": 3, "max_new_tokens": 16}, {"Idempotency-Key": "replay-1"}
    first = attack.post("/generate", json=body, headers={**AUTH1, **key})
    assert first.status_code == 200, first.text
    [idem] = [k for k in attack.redis.scan_iter(match=contract.idempotency_key(attack.tenant(K1), "replay-1"))]
    assert 0 < attack.redis.ttl(idem) <= contract.EVENTS_TTL_S  # never names a request whose events are gone
    attack.redis.delete(contract.events_key(first.json()["request_id"]))  # what expiry does
    started = time.monotonic()
    replay = attack.post("/generate", json=body, headers={**AUTH1, **key}, timeout=30)
    assert replay.status_code == 410 and replay.json()["code"] == "expired", replay.text
    assert time.monotonic() - started < 5


# ----------------------------------------------------------------- 4: Redis restarts
def test_after_a_redis_restart_every_request_succeeds(attack: Attack):
    """Item 4: Redis killed (-9) and restarted: once it answers again, no request gets a 503 (stale pooled
    connections are retried on a fresh one)."""
    small = {"max_new_tokens": 16, "max_denoising_steps": 4}

    async def burst(n: int, tag: str) -> list[int]:
        async with httpx.AsyncClient(base_url=attack.svc.url, headers=AUTH1, timeout=60) as http:
            answers = await asyncio.gather(*(http.post("/generate", json={"prompt": f"{tag} {i}", "seed": i, **small})
                                             for i in range(n)))
        for a in answers:
            attack.tally.answer(a.status_code)
        return [a.status_code for a in answers]

    assert set(asyncio.run(burst(12, "warm"))) == {200}  # the gateway's pools now hold several connections
    attack.svc.redis.stop(kill=True)
    attack.svc.redis.start()
    assert wait_for(lambda: attack.redis.ping(), timeout=10)
    codes = asyncio.run(burst(24, "after"))
    codes += [attack.post("/generate", json={"prompt": f"one by one {i}", **small}).status_code for i in range(6)]
    print(f"\nafter the restart: {Counter(codes)}")
    assert set(codes) == {200}, Counter(codes)


# ----------------------------------------------------------------- 5: a worker frozen past its lease
def ws_events(url: str, body: dict, until=None, headers: dict | None = None) -> list[dict]:
    """One request over its own WebSocket, every event until its final one (or until `until(events)`)."""
    async def run() -> list[dict]:
        events: list[dict] = []
        async with websockets.connect(url, max_size=None, additional_headers=headers or AUTH1) as ws:
            await ws.send(json.dumps({"type": "generate", **body}))
            while not events or events[-1]["type"] not in contract.FINAL_TYPES:
                events.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=120)))
                if until is not None and until(events):
                    break
        return events
    return asyncio.run(run())


def check_one_clean_run(attack: Attack, events: list[dict]) -> None:
    """Steps 1, 2, ... of each canvas exactly once, one final event: nothing lost, nothing duplicated."""
    rid = events[0]["request_id"]
    numbers = [(e["canvas"], e["step"]) for e in events if e["type"] == "step"]
    finals = [e for e in events if e["type"] in contract.FINAL_TYPES]
    if len(finals) != 1 or len(set(numbers)) != len(numbers):
        attack.tally.duplicated.append(rid)
    expected = [(c, s) for c in sorted({c for c, _ in numbers}) for s in range(1, 1 + max(
        s for cc, s in numbers if cc == c))]
    if numbers != expected:
        attack.tally.lost.append(rid)
    assert len(finals) == 1 and numbers == expected, (finals, numbers[:5], len(numbers))


def test_a_worker_frozen_past_its_lease_runs_each_request_once(attack: Attack):
    """Item 5: SIGSTOP a lone worker past its lease (2 s) and wake it: it keeps what it runs (no `restarted`, no
    duplicate steps), rather than reclaiming its own requests a second time."""
    import signal

    body = {"prompt": "freeze", "max_new_tokens": 81, **SLOW, "max_denoising_steps": 120}

    async def scenario() -> list[list[dict]]:
        streams: list[list[dict]] = [[], []]

        async def one(i: int) -> None:
            async with websockets.connect(attack.svc.ws_url, additional_headers=AUTH1) as ws:
                await ws.send(json.dumps({"type": "generate", **body, "seed": i}))
                while not streams[i] or streams[i][-1]["type"] not in contract.FINAL_TYPES:
                    streams[i].append(json.loads(await asyncio.wait_for(ws.recv(), timeout=120)))

        tasks = [asyncio.create_task(one(i)) for i in range(2)]
        while not all(any(e["type"] == "step" for e in s) for s in streams):
            await asyncio.sleep(0.05)
        attack.worker.signal(signal.SIGSTOP)
        await asyncio.sleep(3.5)
        attack.worker.signal(signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        return streams

    streams = asyncio.run(scenario())
    for events in streams:
        attack.tally.inputs += 1
        assert not any(e["type"] == "restarted" for e in events)
        check_one_clean_run(attack, events)
        assert events[-1]["type"] == "done" and events[-1]["usage"]["denoising_steps"] == 120


def test_a_woken_worker_whose_lease_was_taken_drops_the_row(attack: Attack):
    """Item 5: while the worker is frozen, another consumer takes its job over (as a live worker would): once
    awake, the worker publishes nothing more for it and its row leaves the batch."""
    import signal

    seen: list[dict] = []

    def steps_written(rid: str) -> int:
        return sum(json.loads(f[b"e"])["type"] == "step" for _, f in attack.redis.xrange(contract.events_key(rid)))

    async def scenario() -> tuple[int, int, dict]:
        async with websockets.connect(attack.svc.ws_url, additional_headers=AUTH1) as ws:
            await ws.send(json.dumps({"type": "generate", "prompt": "taken", "max_new_tokens": 81, **SLOW}))
            while sum(e["type"] == "step" for e in seen) < 3:
                seen.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=60)))
            rid = seen[0]["request_id"]
            attack.worker.signal(signal.SIGSTOP)
            await asyncio.sleep(2.5)  # past its lease
            stream = contract.request_stream("adv")
            [entry] = [p for p in attack.redis.xpending_range(stream, contract.GROUP, "-", "+", 100)
                       if p["consumer"] == b"w1-adv"]
            attack.redis.xclaim(stream, contract.GROUP, "another-worker", 0, [entry["message_id"]], justid=True)
            before = steps_written(rid)
            attack.worker.signal(signal.SIGCONT)
            for _ in range(10):  # the other worker holds it, renewing its lease as a live worker does
                attack.redis.xclaim(stream, contract.GROUP, "another-worker", 0, [entry["message_id"]], justid=True)
                await asyncio.sleep(0.3)
            after = steps_written(rid)
            info = json.loads(attack.redis.get(contract.worker_key("w1-adv")))
            # the other worker would end it; here the test does
            attack.redis.xack(stream, contract.GROUP, entry["message_id"])
            attack.redis.xdel(stream, entry["message_id"])
            await ws.send(json.dumps({"type": "cancel", "request_id": rid}))
            return before, after, info

    before, after, info = asyncio.run(scenario())
    attack.tally.inputs += 1
    print(f"\nsteps written before the takeover {before}, after the worker woke {after}; its rows: {info['active']}")
    assert after == before  # not a step more from the old owner
    assert info["active"] == 0, info  # its row left the batch


# ----------------------------------------------------------------- 6: cancel right after `queued`
def test_a_cancel_sent_right_after_queued_is_never_lost(attack: Attack):
    """Item 6: 40 requests, each cancelled the moment its `queued` event arrives: every one ends `cancelled`,
    none runs its 300 steps."""
    async def one(i: int) -> list[dict]:
        events: list[dict] = []
        async with websockets.connect(attack.svc.ws_url, additional_headers=AUTH1) as ws:
            await ws.send(json.dumps({"type": "generate", "prompt": f"cancel {i}", "seed": i, "max_new_tokens": 81,
                                      **SLOW}))
            while not events or events[-1]["type"] not in contract.FINAL_TYPES:
                events.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=120)))
                if events[-1]["type"] == "queued":
                    await ws.send(json.dumps({"type": "cancel", "request_id": events[-1]["request_id"]}))
        return events

    async def scenario() -> list[list[dict]]:
        return await asyncio.gather(*(one(i) for i in range(40)))

    streams = asyncio.run(scenario())
    attack.tally.inputs += 40
    codes = Counter(s[-1].get("code", s[-1]["type"]) for s in streams)
    steps = [sum(e["type"] == "step" for e in s) for s in streams]
    print(f"\n40 cancelled at `queued`: finals {dict(codes)}, steps run: max {max(steps)}")
    assert codes == {"cancelled": 40}, codes
    assert max(steps) < 300


@contextlib.contextmanager
def inprocess_runner(model, tokenizer, tmp_path: Path, hooks=None) -> Iterator[str]:
    """A worker's runner and engine in this process, on a Redis of their own; yields the Redis URL."""
    import threading

    from dgserve.redis_server import RedisServer
    from worker.engine import Engine, EngineConfig
    from worker.runner import Runner

    server = RedisServer(data_dir=tmp_path / "redis").start()
    runner = Runner(Engine(model, EngineConfig(max_batch=4, max_context=512)), tokenizer, server.url, "inproc",
                    "inproc-1", heartbeat_interval_s=0.5, hooks=hooks)
    runner.start()
    loop = threading.Thread(target=runner.run, daemon=True)
    loop.start()
    try:
        yield server.url
    finally:
        runner.stop()
        loop.join(timeout=30)
        server.close()


def inprocess_job(tokenizer, rid: str, **sampling) -> contract.Job:
    params = dict(max_new_tokens=32, max_denoising_steps=300, entropy_bound=0.1, t_min=0.4, t_max=0.8,
                  stability_threshold=1, confidence_threshold=1e-9, seed=1)
    return contract.Job(request_id=rid, model="inproc", prompt_ids=tokenizer("hello")["input_ids"],
                        sampling=contract.Sampling(**{**params, **sampling}))


def test_a_cancel_that_lands_between_take_and_admission_is_kept(tiny_model, tmp_path):
    """Item 6, with the window held open: an in-process runner (real engine, real Redis) whose admission hook
    is slow. The engine is busy with another request, so a cancel that reached it before the job would be
    forgotten at the next step; the request must still end `cancelled`, not run its 300 steps."""
    from service.broker import Broker
    from worker.hooks import RunnerHooks

    model, tokenizer = tiny_model

    class SlowAdmission(RunnerHooks):
        def admitted(self, job: contract.Job) -> None:
            if job.request_id == "target":
                time.sleep(0.5)

    async def scenario(url: str) -> list[str]:
        broker = Broker(url)

        async def running(rid: str) -> bool:
            return await broker.redis.hget(contract.request_key(rid), contract.STATUS_FIELD) == b"running"

        try:
            await broker.submit(inprocess_job(tokenizer, "busy"), tenant="t", max_depth=10)
            while not await running("busy"):
                await asyncio.sleep(0.01)
            await broker.submit(inprocess_job(tokenizer, "target"), tenant="t", max_depth=10)
            while not await running("target"):  # taken: now in its admission
                await asyncio.sleep(0.005)
            await broker.cancel("target")
            events = [e.parse() async for _, e in broker.events("target")]
            await broker.cancel("busy")
            return [e.type if e.type != "error" else e.code for e in events]
        finally:
            await broker.close()

    with inprocess_runner(model, tokenizer, tmp_path, hooks=SlowAdmission()) as url:
        kinds = asyncio.run(asyncio.wait_for(scenario(url), timeout=120))
    print(f"\ncancelled inside the take window: {Counter(kinds)}")
    assert kinds[-1] == "cancelled" and kinds.count("step") < 300, Counter(kinds)


def test_a_step_with_non_finite_entropies_ends_its_request(tiny_model, tmp_path):
    """Item 8, at the worker: a model that yields NaN (here a copy with a poisoned output head) ends the request
    with a `numerical_error`; no step with NaN is ever written (JSON has no NaN: followers would choke)."""
    import copy

    import torch

    from service.broker import Broker

    model, tokenizer = tiny_model
    poisoned = copy.deepcopy(model)
    with torch.no_grad():
        poisoned.lm_head.weight.fill_(float("nan"))

    async def scenario(url: str) -> list[str]:
        broker = Broker(url)
        try:
            await broker.submit(inprocess_job(tokenizer, "nan", max_denoising_steps=4), tenant="t", max_depth=10)
            return [raw.text async for _, raw in broker.events("nan")]
        finally:
            await broker.close()

    with inprocess_runner(poisoned, tokenizer, tmp_path) as url:
        texts = asyncio.run(asyncio.wait_for(scenario(url), timeout=120))
    events = [json.loads(t) for t in texts]
    assert [e["type"] for e in events] == ["queued", "error"], texts  # not one step written
    assert events[-1]["code"] == "numerical_error", events[-1]


# ----------------------------------------------------------------- 9: deadlines, request streams, context
def test_a_running_request_ends_at_its_step_budget(attack: Attack):
    """Item 9: a request within every field limit (500 steps a canvas) ends at the deployment's step budget with
    a clear error event, instead of holding its row to the end."""
    events = ws_events(attack.svc.ws_url, {"prompt": "long", "max_new_tokens": 162, **SLOW,
                                           "max_denoising_steps": 500})
    attack.tally.inputs += 1
    steps = sum(e["type"] == "step" for e in events)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "deadline_exceeded", events[-1]
    assert steps == STEP_BUDGET and "limit" in events[-1]["message"]
    check_one_clean_run(attack, events[:-1] + [events[-1]])


def test_finished_requests_leave_the_request_stream(attack: Attack):
    """Item 9: a request stream holds what waits or runs, not every request ever made."""
    stream = contract.request_stream("adv")
    before = attack.redis.xinfo_stream(stream)["last-generated-id"].decode()
    for i in range(3):
        assert attack.post("/generate", json={"prompt": f"gone {i}", "max_new_tokens": 16}).status_code == 200
    assert attack.redis.xinfo_stream(stream)["last-generated-id"].decode() != before
    assert wait_for(lambda: not attack.redis.xrange(stream, min="(" + before), timeout=5)


def test_request_streams_are_trimmed_by_age(tmp_path):
    """Item 9: an entry older than REQUEST_STREAM_MAX_AGE_S (one nobody will ever acknowledge) is trimmed by the
    next submit. Against a Redis of its own, through the gateway's broker."""
    from dgserve.redis_server import RedisServer
    from service.broker import Broker

    server = RedisServer(data_dir=tmp_path / "redis").start()
    try:
        r = redis.Redis.from_url(server.url)
        stream = contract.request_stream("ghost")
        r.xgroup_create(stream, contract.GROUP, id="0", mkstream=True)
        r.xadd(stream, {contract.JOB_FIELD: "{}"}, id="1-0")  # from 1970
        job = contract.Job(request_id="fresh", model="ghost", prompt_ids=[1, 2], sampling=contract.Sampling(
            max_new_tokens=8, max_denoising_steps=4, entropy_bound=0.1, t_min=0.4, t_max=0.8, stability_threshold=1,
            confidence_threshold=0.005, seed=0))

        async def submit() -> None:
            broker = Broker(server.url)
            await broker.submit(job, tenant="t", max_depth=10)
            await broker.close()

        asyncio.run(submit())
        assert [e for e, _ in r.xrange(stream)] != [b"1-0"] and r.xlen(stream) == 1
    finally:
        server.close()


def test_a_prompt_longer_than_every_worker_context_is_refused_at_the_door(attack: Attack):
    """Item 9: the worker publishes its max_context (2048); a prompt that cannot fit is a 422 naming the field
    and the limit, and never takes a queue slot."""
    assert wait_for(lambda: attack.redis.get(contract.worker_key("w1-adv")), timeout=5)
    time.sleep(2.5)  # the gateway reads the heartbeats every 2 s
    before = attack.redis.xinfo_stream(contract.request_stream("adv"))["last-generated-id"]
    resp = attack.post("/generate", json={"prompt": "x" * 2000})
    assert resp.status_code == 422, resp.text
    [error] = resp.json()["detail"]
    assert error["loc"] == ["body", "prompt"] and "2048" in error["msg"], error
    v1 = attack.post("/v1/completions", json={"model": "adv", "prompt": "y" * 1000, "max_tokens": 2000})
    assert v1.status_code == 400 and v1.json()["error"]["param"] == "max_new_tokens", v1.text
    assert attack.redis.xinfo_stream(contract.request_stream("adv"))["last-generated-id"] == before


# ----------------------------------------------------------------- 7, 8, 13: malformed and hostile input
DEEP = "[" * 50_000 + "]" * 50_000
HOSTILE_HTTP = [
    ("/generate", '{"prompt": "x", "entropy_bound": NaN}', "entropy_bound"),
    ("/generate", '{"prompt": "x", "t_max": Infinity}', "t_max"),
    ("/generate", '{"prompt": "x", "t_min": -Infinity}', "t_min"),
    ("/generate", '{"prompt": "x", "confidence_threshold": 1e400}', "confidence_threshold"),
    ("/generate", '{"prompt": "\\ud800"}', "prompt"),
    ("/generate", '{"messages": [{"role": "user", "content": "\\udfff"}]}', "content"),
    ("/generate", '{"prompt": "x", "template": "\\ud800__"}', "template"),
    ("/generate", '{"prompt": "x", "model": "\\ud800"}', "model"),
    ("/generate", '{"prompt": "x", "\\ud800": 1}', ""),
    ("/generate", '{"prompt": "x", "seed": 99999999999999999999999999}', "seed"),
    ("/generate", '{"prompt": "x", "max_new_tokens": ' + "9" * 5000 + "}", ""),
    ("/generate", '{"prompt": ' + DEEP + "}", ""),
    ("/generate", "[" * 100_000, ""),
    ("/generate", '{"prompt": "x", "t_min": 0, "t_max": 1e-39}', "t_max"),  # item 8
    ("/generate", '{"prompt": "x", "template": "a__b", "template_hole": "__"}', "template_hole"),  # item 13
    ("/generate", '{"prompt": "x", "seed": "12"}', "seed"),
    ("/v1/completions", '{"model": "adv", "prompt": "x", "t_max": NaN}', "t_max"),
    ("/v1/completions", '{"model": "adv", "prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", '{"model": "adv", "prompt": ' + DEEP + "}", ""),
    ("/v1/completions", '{"model": "adv", "prompt": "x", "stop": ["\\ud800"]}', "stop"),
    ("/v1/completions", '{"model": "adv", "prompt": "x", "max_tokens": 1e999}', "max_tokens"),
    ("/v1/completions", '{"model": "adv", "prompt": "x", "stream": "yes"}', "stream"),  # item 13
    ("/v1/completions", '{"model": "adv", "prompt": "x", "t_min": 0, "t_max": 1e-39, "stream": true, '
     '"diffusing": true}', "t_max"),  # item 8
    ("/v1/chat/completions", '{"model": "adv", "messages": [{"role": "user", "content": "\\ud800"}]}', "content"),
    ("/v1/chat/completions", '{"model": "\\udbff", "messages": []}', "model"),
    ("/sudoku", '{"puzzle": "' + PUZZLE + '", "model": "adv", "t_min": NaN}', "t_min"),
    ("/sudoku", '{"puzzle": "\\ud800", "model": "adv"}', "puzzle"),
]


@pytest.mark.parametrize("path, body, field", HOSTILE_HTTP, ids=[f"{p}:{b[:40]}" for p, b, _ in HOSTILE_HTTP])
def test_hostile_json_gets_a_4xx_naming_where_and_the_connection_lives(attack: Attack, path, body, field):
    """Items 7, 8, 13: NaN, Infinity, overflowing numbers, lone surrogates, deep nesting, huge integers, strings
    for numbers, a temperature whose entropies would be NaN, a multi-character hole: a 4xx that names the field,
    on a connection that serves the next request."""
    status, text = attack.raw("POST", path, body)
    assert 400 <= status < 500, (status, text[:300])
    assert field in text, text[:300]
    assert "Traceback" not in text


def test_sudoku_and_n_choices_take_the_largest_seed(attack: Attack):
    """Items 7, 13: seed 2^63-1 is valid: its attempts and choices wrap, rather than 500 or 400."""
    top = 2**63 - 1
    status, text = attack.raw("POST", "/sudoku", json.dumps({"puzzle": PUZZLE, "model": "adv", "attempts": 8,
                                                            "seed": top, "max_denoising_steps": 2}))
    assert status == 200, text[:300]
    client = openai.OpenAI(base_url=attack.svc.url + "/v1", api_key=K1, max_retries=0, timeout=60)
    out = client.completions.create(model="adv", prompt="x", max_tokens=8, n=2, seed=top,
                                    extra_body={"max_denoising_steps": 2})
    attack.tally.answer(200)
    assert [c.index for c in out.choices] == [0, 1]


def test_a_diffusing_stream_that_errors_says_so(attack: Attack):
    """Item 8: a /v1 diffusing stream whose request ends in an error carries that error, not just [DONE]."""
    client = openai.OpenAI(base_url=attack.svc.url + "/v1", api_key=K1, max_retries=0, timeout=120)
    with pytest.raises(openai.APIError) as err:
        for _ in client.completions.create(model="adv", prompt="x", max_tokens=81, stream=True, extra_body={
                "diffusing": True, **SLOW, "max_denoising_steps": 500}):
            pass
    attack.tally.answer(200)
    assert "limit" in str(err.value), err.value


def test_hostile_websocket_messages_get_error_events_and_spare_the_others(attack: Attack):
    """Item 7: a 100,000-deep message, NaN, surrogates and huge integers on a connection that runs a request:
    each gets an error event, the connection stays open and its request runs to the end."""
    messages = ["[" * 100_000 + "]" * 100_000, '{"type": "generate", "prompt": "x", "t_max": NaN}',
                '{"type": "generate", "prompt": "\\ud800"}', '{"type": "generate", "prompt": "x", "seed": 1e999}',
                '{"type": "cancel", "request_id": "\\udc00"}', '{"type": "generate", "prompt": "x", "ref": [[[1]]]}',
                '{"type": "resume", "request_id": "x", "offset": 99999999999999999999999}']

    async def scenario() -> tuple[list[dict], list[dict]]:
        async with websockets.connect(attack.svc.ws_url, additional_headers=AUTH1, max_size=None) as ws:
            await ws.send(json.dumps({"type": "generate", "prompt": "bystander", "max_new_tokens": 81,
                                      "max_denoising_steps": 60, "ref": "b"}))
            answers, bystander = [], []
            for raw in messages:
                await ws.send(raw)
            while len(answers) < len(messages) or not bystander or bystander[-1]["type"] not in ("done", "error"):
                event = json.loads(await asyncio.wait_for(ws.recv(), timeout=60))
                (answers if event.get("request_id") is None else bystander).append(event)
            return answers, bystander

    answers, bystander = asyncio.run(scenario())
    for a in answers:
        attack.tally.answer(422)
        assert a["type"] == "error" and a["code"] in ("invalid_json", "validation_error"), a
    assert bystander[-1]["type"] == "done", bystander[-1]  # not cancelled by its neighbours


# ----------------------------------------------------------------- 10: slowloris
def test_slow_clients_are_cut_off(attack: Attack):
    """Item 10: 200 connections sending partial headers or a partial body are closed once DG_READ_TIMEOUT_S
    passes; the service answers everyone else meanwhile."""
    socks = []
    for i in range(200):
        s = socket.create_connection(("127.0.0.1", attack.svc.port), timeout=10)
        if i % 2:
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        else:
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\nAuthorization: Bearer " + K1.encode() + b"\r\n\r\n{\"pro")
        socks.append(s)
    assert attack.post("/generate", json={"prompt": "meanwhile", **CHEAP}).status_code == 200
    time.sleep(READ_TIMEOUT_S + 2)
    still_open = 0
    for s in socks:
        s.settimeout(3)
        try:
            while s.recv(4096):
                pass
        except TimeoutError:
            still_open += 1
        except OSError:
            pass
        s.close()
    attack.tally.inputs += 200
    print(f"\nslow connections still open after {READ_TIMEOUT_S + 2:.1f} s: {still_open} of 200")
    assert still_open == 0


# ----------------------------------------------------------------- 11: keys, origins, content types
def ws_status(url: str, headers: dict | None = None) -> int:
    async def connect() -> int:
        try:
            async with websockets.connect(url, additional_headers=headers, open_timeout=10):
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code
    return asyncio.run(connect())


def test_keys_origins_and_content_types(attack: Attack):
    """Item 11: only `?api_key=` (spelled so) authenticates a WebSocket, and no key is logged; a page of another
    origin cannot open one; a JSON route refuses a body that is not JSON (text/plain needs no preflight);
    refusing a WebSocket logs no ERROR."""
    url = attack.svc.ws_url
    own = {"Origin": f"http://127.0.0.1:{attack.svc.port}"}
    codes = {"api%5Fkey": ws_status(f"{url}?api%5Fkey={K2}"), "api_key": ws_status(f"{url}?api_key={K2}"),
             "other origin": ws_status(url, {**AUTH1, "Origin": "http://evil.example"}),
             "own origin": ws_status(url, {**AUTH1, **own}), "no origin": ws_status(url, AUTH1)}
    attack.tally.inputs += len(codes)
    print(f"\nWebSocket opens: {codes}")
    assert codes == {"api%5Fkey": 401, "api_key": 101, "other origin": 403, "own origin": 101, "no origin": 101}
    status, text = attack.raw("POST", "/v1/completions", '{"model": "adv", "prompt": "x", "max_tokens": 8}',
                              headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in text, text
    log = attack.svc.gateway.log()
    assert K2 not in log and K2.replace("-", "%2D") not in log
    assert not [line for line in log.splitlines() if " ERROR " in line and "WebSocket" in line or
                "handshake" in line], log[-2000:]


# ----------------------------------------------------------------- 12: resume
def test_a_stream_resumes_after_the_gateway_restarts(attack: Attack):
    """Item 12: a client whose gateway restarted (SIGTERM: 1001 going away) resumes its request from the events
    it has, over a new WebSocket and over GET /requests/{id}/events; another caller cannot."""
    body = {"prompt": "resume me", "max_new_tokens": 81, "max_denoising_steps": 120, "confidence_threshold": 1e-9}

    async def until_the_gateway_goes() -> tuple[list[dict], int]:
        events: list[dict] = []
        async with websockets.connect(attack.svc.ws_url, additional_headers=AUTH1, max_size=None) as ws:
            await ws.send(json.dumps({"type": "generate", **body}))
            while sum(e["type"] == "step" for e in events) < 5:
                events.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=60)))
            stopping = asyncio.get_running_loop().run_in_executor(None, attack.svc.gateway.stop, 30)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    events.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=60)))
            await stopping
        return events, closed.value.rcvd.code

    first, code = asyncio.run(until_the_gateway_goes())
    assert code == 1001 and first[-1]["type"] == "step"
    rid = first[0]["request_id"]
    attack.svc.start_gateway()
    attack.svc.wait_gateway()
    attack.http.close()
    attack.http = httpx.Client(base_url=attack.svc.url, timeout=120, headers=AUTH1)

    async def resume(headers: dict, offset: int) -> list[dict]:
        events: list[dict] = []
        async with websockets.connect(attack.svc.ws_url, additional_headers=headers, max_size=None) as ws:
            await ws.send(json.dumps({"type": "resume", "request_id": rid, "offset": offset}))
            while not events or events[-1]["type"] not in contract.FINAL_TYPES:
                events.append(json.loads(await asyncio.wait_for(ws.recv(), timeout=60)))
                if events[-1].get("request_id") is None or events[-1].get("code") == "unknown_request":
                    break
        return events

    stranger = asyncio.run(resume(AUTH2, 0))
    rest = asyncio.run(resume(AUTH1, len(first)))
    attack.tally.inputs += 2
    assert stranger[-1]["code"] == "unknown_request", stranger
    whole = first + rest
    check_one_clean_run(attack, whole)
    assert whole[-1]["type"] == "done" and whole[-1]["usage"]["denoising_steps"] == 120
    sse = attack.http.get(f"/requests/{rid}/events", params={"offset": 3})
    events = [json.loads(line[6:]) for line in sse.text.splitlines() if line.startswith("data: ")]
    ids = [int(line[4:]) for line in sse.text.splitlines() if line.startswith("id: ")]
    assert sse.status_code == 200 and events == whole[3:] and ids == list(range(3, len(whole)))
    assert attack.http.get(f"/requests/{rid}/events", headers=AUTH2).status_code == 404
    attack.tally.answer(200)
    attack.tally.answer(404)


# ----------------------------------------------------------------- fuzz: every field, hostile JSON
DEEP_MARK = "\x00deep\x00"  # stands for a 5,000-deep array, spliced into the encoded text


@functools.cache
def hostile_values():
    """NaN, infinities, overflow, lone surrogates, deep nesting, integers past 64 bits, strings for numbers,
    and random JSON around them."""
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e-39, "\ud800", "a\udfffb", "", "yes", "12",
                         2**63, -(2**63) - 1, 10**40, -1, 0, True, None, DEEP_MARK]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.integers(min_value=2**63, max_value=2**90), st.integers(max_value=-(2**63) - 1, min_value=-(2**90)),
    )
    return st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.text(max_size=6), kids, max_size=3), max_leaves=6)


def encode_hostile(value: dict) -> str:
    """JSON as a hostile client writes it: NaN and Infinity bare, surrogates escaped, DEEP_MARK spliced."""
    return json.dumps(value, allow_nan=True).replace(json.dumps(DEEP_MARK), "[" * 5000 + "]" * 5000)


def route_fields() -> dict[str, tuple[dict, list[str]]]:
    """Each JSON route: a valid body that runs two denoising steps, and every field it takes."""
    from protocol.api import GenerateRequest, SudokuRequest
    from service.openai_schemas import ChatRequest, CompletionRequest

    quick = {"max_denoising_steps": 2}
    return {
        "/generate": ({"prompt": "fuzz", "max_new_tokens": 8, **quick}, list(GenerateRequest.model_fields)),
        "/sudoku": ({"puzzle": PUZZLE, "model": "adv", "attempts": 1, **quick}, list(SudokuRequest.model_fields)),
        "/v1/completions": ({"model": "adv", "prompt": "fuzz", "max_tokens": 8, **quick},
                            list(CompletionRequest.model_fields)),
        "/v1/chat/completions": ({"model": "adv", "messages": [{"role": "user", "content": "fuzz"}],
                                  "max_tokens": 8, **quick}, list(ChatRequest.model_fields)),
    }


def test_fuzzed_json_on_every_field_never_gets_a_5xx(attack: Attack):
    """Hypothesis replaces up to three fields of a valid body (any field of the route, or an unknown one) with
    hostile values: every answer is below 500, and the connection serves the next request."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    routes = route_fields()
    seen: Counter = Counter()

    @given(route=st.sampled_from(sorted(routes)), data=st.data())
    @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def attack_route(route: str, data) -> None:
        base, fields = routes[route]
        names = data.draw(st.lists(st.sampled_from([*fields, "\ud800", "extra"]), min_size=1, max_size=3,
                                   unique=True))
        body = {**base, **{name: data.draw(hostile_values()) for name in names}}
        status, text = attack.raw("POST", route, encode_hostile(body))
        seen[f"{status // 100}xx"] += 1
        assert status < 500 and "Traceback" not in text, (route, body, status, text[:300])

    attack_route()
    print(f"\nHTTP fuzz: {dict(seen)}")
    assert seen["4xx"] > 50


def test_fuzzed_websocket_messages_never_break_the_connection(attack: Attack):
    """The same on one WebSocket: every kind of message with hostile fields, each followed by a sentinel
    that must be answered; no internal errors; the connection then still runs a request to the end."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from protocol.api import WsCancel, WsGenerate, WsResume, WsSudoku

    kinds = {"generate": list(WsGenerate.model_fields), "sudoku": list(WsSudoku.model_fields),
             "cancel": list(WsCancel.model_fields), "resume": list(WsResume.model_fields)}
    bases = {"generate": {"prompt": "fuzz", "max_new_tokens": 8, "max_denoising_steps": 2},
             "sudoku": {"puzzle": PUZZLE, "model": "adv", "attempts": 1, "max_denoising_steps": 2},
             "cancel": {}, "resume": {"request_id": "nope"}}
    codes: Counter = Counter()

    async def session(messages: list[str]) -> list[dict]:
        events: list[dict] = []
        async with websockets.connect(attack.svc.ws_url, additional_headers=AUTH1, max_size=None) as ws:
            for n, raw in enumerate(messages):
                await ws.send(raw)
                await ws.send(json.dumps({"type": "cancel", "request_id": f"sentinel-{n}"}))
                while True:
                    event = json.loads(await asyncio.wait_for(ws.recv(), timeout=30))
                    events.append(event)
                    if event.get("request_id") == f"sentinel-{n}":
                        break
            await ws.send(json.dumps({"type": "generate", "prompt": "after the fuzz", "max_new_tokens": 8,
                                      "max_denoising_steps": 2, "ref": "last"}))
            last = None
            while not (events[-1].get("type") == "done" and events[-1].get("request_id") == last):
                event = json.loads(await asyncio.wait_for(ws.recv(), timeout=30))
                if event.get("type") == "queued" and event.get("ref") == "last":
                    last = event["request_id"]
                events.append(event)
        return events

    @given(kind=st.sampled_from(sorted(kinds)), data=st.data())
    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def message(kind: str, data) -> None:
        names = data.draw(st.lists(st.sampled_from([*kinds[kind], "extra"]), min_size=1, max_size=3, unique=True))
        body = {"type": kind, **bases[kind], **{name: data.draw(hostile_values()) for name in names}}
        batch.append(encode_hostile(body))

    batch: list[str] = []
    message()
    events = asyncio.run(session(batch))
    for e in events:
        codes[e.get("code") or e["type"]] += 1
    attack.tally.inputs += len(batch)
    print(f"\nWebSocket fuzz: {len(batch)} messages, events {dict(codes)}")
    assert not codes["internal_error"] and codes["done"] >= 1
