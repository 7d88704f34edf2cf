"""The protocol package on its own (no processes): sampling defaults from a checkpoint's generation config, the
request-status machine, usage, and the rules both sides apply."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocol import contract

ROOT = Path(__file__).resolve().parents[1]


def test_reference_defaults_are_transformers_own():
    from transformers.models.diffusion_gemma import DiffusionGemmaGenerationConfig

    assert contract.sampling_defaults(DiffusionGemmaGenerationConfig()) == contract.REFERENCE_DEFAULTS
    assert contract.sampling_defaults({}) == contract.REFERENCE_DEFAULTS


@pytest.mark.parametrize("name", ["sudoku", "text"])
def test_sampling_defaults_read_the_json_file_and_the_config_class_alike(name):
    from transformers.models.diffusion_gemma import DiffusionGemmaGenerationConfig

    raw = json.loads((ROOT / "models" / name / "generation_config.json").read_text())
    loaded = DiffusionGemmaGenerationConfig.from_pretrained(ROOT / "models" / name)
    assert contract.sampling_defaults(raw) == contract.sampling_defaults(loaded)
    assert contract.eos_token_ids(raw) == contract.eos_token_ids(loaded) == tuple(raw["eos_token_id"])
    defaults = contract.sampling_defaults(raw)
    assert defaults["entropy_bound"] == raw["sampler_config"]["entropy_bound"]  # nested, as the reference reads it
    assert defaults["max_denoising_steps"] == raw["max_denoising_steps"]


def test_default_sampling_takes_overrides_and_eos_from_the_config():
    config = {"t_min": 0.5, "t_max": 1.5, "eos_token_id": 7, "sampler_config": {"entropy_bound": 0.3}}
    params = contract.default_sampling(config, seed=4, max_new_tokens=81)
    assert (params.t_min, params.t_max, params.entropy_bound, params.eos_token_ids) == (0.5, 1.5, 0.3, (7,))
    assert (params.seed, params.max_new_tokens, params.max_denoising_steps) == (4, 81, 48)
    assert contract.eos_token_ids({}, {"text_config": {"eos_token_id": [1, 106]}}) == (1, 106)
    assert contract.eos_token_ids({}) == ()


# ----------------------------------------------------------------------------- the request-status machine
@pytest.fixture(scope="module")
def redis_client():
    import redis

    from dgserve.redis_server import RedisServer

    with RedisServer(appendonly=False) as server:
        client = redis.Redis.from_url(server.url)
        yield client
        client.close()


STARTS = [None, *contract.Status]


def _request(r, status: contract.Status | None) -> str:
    """A request hash in `status` (None: no status kept), and a job for it that worker `w` owns."""
    import uuid

    rid = uuid.uuid4().hex
    stream = contract.request_stream("m")
    if status is not None:
        r.hset(contract.request_key(rid), contract.STATUS_FIELD, status)
    try:
        r.xgroup_create(stream, contract.GROUP, id="0", mkstream=True)
    except Exception:  # the group exists
        pass
    r.xadd(stream, {contract.JOB_FIELD: rid})
    return rid


def _status(r, rid: str) -> str | None:
    raw = r.hget(contract.request_key(rid), contract.STATUS_FIELD)
    return raw.decode() if raw is not None else None


def _moved_as_allowed(start: contract.Status | None, end: str | None) -> bool:
    return end == start or contract.may_move(start, end)  # type: ignore[arg-type]


@pytest.mark.parametrize("start", STARTS)
def test_take_moves_only_along_the_transitions(redis_client, start):
    r = redis_client
    rid = _request(r, start)
    verdict, _ = r.register_script(contract.TAKE_LUA)(keys=[contract.request_key(rid)], args=["w"])
    end = _status(r, rid)
    assert _moved_as_allowed(start, end)
    assert (verdict.decode() == contract.Take.SKIP) == (start in contract.FINAL_STATUSES)
    if verdict.decode() == contract.Take.RUN:
        assert end == contract.Status.RUNNING


@pytest.mark.parametrize("start", STARTS)
def test_the_queue_timeout_ends_only_a_queued_request(redis_client, start):
    r = redis_client
    rid = _request(r, start)
    event = contract.encode(contract.queue_timeout(rid))
    ended = r.register_script(contract.TIMEOUT_LUA)(keys=[contract.request_key(rid), contract.events_key(rid)],
                                                    args=[event, 60])
    assert bool(ended) == (start == contract.Status.QUEUED)
    assert _status(r, rid) == (contract.Status.ERROR if ended else start)
    assert r.xlen(contract.events_key(rid)) == (1 if ended else 0)


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("final", sorted(contract.FINAL_STATUSES))
def test_a_final_publish_moves_only_along_the_transitions(redis_client, start, final):
    """A worker that owns the job publishes a final event: the status moves only where TRANSITIONS allows (a
    request that already ended keeps its status)."""
    r = redis_client
    rid = _request(r, start)
    stream = contract.request_stream("m")
    [(_, [(entry_id, _)])] = r.xreadgroup(contract.GROUP, "w", {stream: ">"}, count=1)
    lost = r.register_script(contract.PUBLISH_LUA)(
        keys=[stream, contract.events_key(rid), contract.request_key(rid)],
        args=[contract.GROUP, "w", 60, 1, entry_id, final, 1, "{}"])
    assert lost == []
    end = _status(r, rid)
    assert _moved_as_allowed(start, end)
    assert end == (final if contract.may_move(start, final) else start)


def test_every_script_spells_its_names_from_the_contract():
    """No status, field or verdict is spelled inside a script: each comes from the names of this module."""
    for name in ("SUBMIT_LUA", "WAITING_LUA", "PUBLISH_LUA", "TAKE_LUA", "TIMEOUT_LUA"):
        script = getattr(contract, name)
        assert "$" not in script, name  # every placeholder was formatted in
    assert f"'{contract.CANCEL_REQUESTED_FIELD}'" in contract.TAKE_LUA
    queued = f"'{contract.Status.QUEUED}'"
    assert queued in contract.SUBMIT_LUA and queued in contract.TIMEOUT_LUA


def test_usage_is_built_in_one_place():
    one = contract.Usage.of(prompt_tokens=5, completion_tokens=30, canvases=1, denoising_steps=8)
    assert one.tokens_per_forward == 3.75
    assert contract.Usage.of(5, 0, 0, 0).tokens_per_forward == 0  # no step taken: no division by zero
    both = contract.Usage.total([one, contract.Usage.of(5, 10, 1, 2)])
    assert (both.prompt_tokens, both.completion_tokens, both.canvases, both.denoising_steps) == (5, 40, 2, 10)
    assert both.tokens_per_forward == 4.0


def test_the_temperature_schedule_rule_holds_for_every_job():
    base = {**contract.REFERENCE_DEFAULTS, "seed": 0}
    with pytest.raises(ValueError, match=r"t_max \(0.4\) must be greater than t_min \(0.4\)"):
        contract.Sampling(**{**base, "t_max": 0.4})
    assert contract.temperature_problem(0.4, 0.8) is None


def test_the_queue_deadline_rule():
    job = contract.Job(request_id="r", model="m", prompt_ids=[1], sampling=contract.default_sampling({}, seed=0),
                       deadline=100.0)
    assert not job.past_queue_deadline(now=99.0) and job.past_queue_deadline(now=101.0)
    assert not job.past_queue_deadline(attempt=2, now=101.0)  # taken again after its worker died: it ran
    assert not job.model_copy(update={"deadline": None}).past_queue_deadline(now=1e12)
    assert contract.queue_timeout("r").code == contract.TIMEOUT
