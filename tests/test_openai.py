"""Our OpenAI-compatible endpoints driven by the real `openai` Python package against a running service."""

from __future__ import annotations

import time

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=service.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)


@pytest.fixture
def aclient(service):
    return openai.AsyncOpenAI(base_url=service.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)


def test_models_are_listed(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_matches_our_own_endpoint_for_a_seed(client, service):
    out = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=48, seed=11)
    ours = httpx.post(service.url + "/generate", json={"prompt": "The quick brown fox", "max_new_tokens": 48,
                                                       "seed": 11}, timeout=60).json()
    choice = out.choices[0]
    assert choice.text == ours["text"]
    assert choice.finish_reason == ("length" if ours["finish_reason"] == "length" else "stop")
    assert out.usage.completion_tokens == ours["usage"]["completion_tokens"]
    assert out.usage.prompt_tokens == ours["usage"]["prompt_tokens"]
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.usage.model_extra["denoising_steps"] == ours["usage"]["denoising_steps"]


def test_chat_completion_uses_the_chat_template(client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                         max_completion_tokens=16, seed=2)
    assert out.choices[0].message.role == "assistant"
    assert isinstance(out.choices[0].message.content, str)
    assert out.usage.prompt_tokens > 6  # <bos><start_of_turn>user\n hello <end_of_turn>\n<start_of_turn>model\n
    assert out.choices[0].finish_reason in ("stop", "length")


async def test_async_client(aclient):
    out = await aclient.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=16, seed=3)
    assert out.choices[0].message.content is not None


def test_streaming_sends_committed_text_and_usage(client):
    full = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a story"}],
                                          max_tokens=80, seed=5)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "a story"}], max_tokens=80, seed=5, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # no diffusing: no draft ever streams, only committed canvases (at most one chunk per canvas + role + end)
    assert len(chunks) <= full.usage.model_extra["canvases"] + 3


async def test_async_streaming_completions(aclient):
    stream = await aclient.completions.create(model="tiny", prompt="stream me", max_tokens=40, seed=9, stream=True)
    pieces = [c.choices[0].text async for c in stream if c.choices]
    full = await aclient.completions.create(model="tiny", prompt="stream me", max_tokens=40, seed=9)
    assert "".join(pieces) == full.choices[0].text


def test_diffusing_streams_every_draft_as_a_whole_replacement(client):
    full = client.completions.create(model="tiny", prompt="watch it converge", max_tokens=64, seed=4,
                                     extra_body={"max_denoising_steps": 5})
    chunks = list(client.completions.create(model="tiny", prompt="watch it converge", max_tokens=64, seed=4,
                                            stream=True, extra_body={"diffusing": True, "max_denoising_steps": 5}))
    drafts = [c for c in chunks if c.choices and not c.choices[0].finish_reason
              and "step" in (c.choices[0].model_extra.get("diffusion") or {})]
    assert len(drafts) == full.usage.model_extra["denoising_steps"]  # one chunk per denoising step
    for c in drafts:
        d = c.choices[0].model_extra["diffusion"]
        assert c.choices[0].text == d["committed"] + d["draft"]  # the whole text, replacing the last
        assert full.choices[0].text.startswith(d["committed"])  # committed text only grows
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert last.choices[0].text == full.choices[0].text


def test_stop_strings_cut_at_a_committed_canvas(client):
    full = client.completions.create(model="tiny", prompt="stop here", max_tokens=96, seed=21).choices[0].text
    assert len(full) > 40
    stop = full[30:33]
    cut = full.find(stop)
    out = client.completions.create(model="tiny", prompt="stop here", max_tokens=96, seed=21, stop=[stop, "\x00"])
    assert out.choices[0].text == full[:cut]
    assert out.choices[0].finish_reason == "stop"


def test_n_gives_several_choices(client):
    out = client.completions.create(model="tiny", prompt="twice", max_tokens=16, n=2, seed=1)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].text != out.choices[1].text  # seeds 1 and 2


@pytest.mark.parametrize("param, value", [
    ("temperature", 0.7), ("top_p", 0.9), ("presence_penalty", 0.5), ("frequency_penalty", 0.5),
    ("logit_bias", {"1": 5}), ("logprobs", True),
])
def test_unsupported_parameters_get_a_400_naming_them(client, param, value):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                       **{param: value})
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and param in err.value.body["message"]
    assert err.value.body["code"] == "unsupported_parameter"


def test_tools_get_a_400(client):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], tools=[tool])
    assert err.value.body["param"] == "tools"


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"extra_body": {"t_min": -1}}, "t_min"),
    ({"extra_body": {"max_denoising_steps": 100000}}, "max_denoising_steps"),
    ({"extra_body": {"bogus": 1}}, "bogus"),
    ({"n": 99}, "n"),
    ({"max_tokens": 10**6}, "max_new_tokens"),
])
def test_invalid_values_get_a_400_in_openai_shape(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", **kwargs)
    assert err.value.body["param"] == param, err.value.body
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["message"]


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt="x")
    assert err.value.body["code"] == "model_not_found"


def test_models_do_not_show_server_paths(service, tiny_checkpoint):
    """Issue 16.5: /v1/models describes the models, never where the server keeps them."""
    r = httpx.get(service.url + "/v1/models")
    assert r.status_code == 200 and str(tiny_checkpoint) not in r.text
    assert all("source" not in m for m in r.json()["data"])


def _left(url: str) -> float:
    """Requests whose client left before their final event, as the gateway counted them."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    return sum(s.value for s in families["dgserve:gateway_request_finished"].samples
               if s.name.endswith("_total") and s.labels["outcome"] == "client_disconnected")


def test_a_stream_whose_client_leaves_cancels_every_choice(client, service):
    """A diffusing stream of n=2 left after its first steps: both requests are cancelled (the one path's cancel on
    exit), and the service serves the next request."""
    import redis

    from protocol import contract

    r = redis.Redis.from_url(service.redis.url)
    before, cancels = _left(service.url), r.xlen(contract.CANCELS)
    stream = client.completions.create(model="tiny", prompt="leave me", max_tokens=64, n=2, stream=True,
                                       extra_body={"diffusing": True, "max_denoising_steps": 500})
    for i, _ in enumerate(stream):
        if i == 4:
            break
    stream.close()
    for _ in range(100):
        if _left(service.url) >= before + 2:
            break
        httpx.get(service.url + "/healthz")
        time.sleep(0.1)
    assert _left(service.url) == before + 2 and r.xlen(contract.CANCELS) == cancels + 2
    r.close()
    assert client.completions.create(model="tiny", prompt="next", max_tokens=8).choices[0].finish_reason
