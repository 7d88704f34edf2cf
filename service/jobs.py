"""From a validated request body to a queued job: tokenize, resolve defaults, apply deployment limits."""

from __future__ import annotations

import secrets
import time
import uuid
from typing import Any

from fastapi.exceptions import RequestValidationError

from protocol import contract
from protocol.api import GenerateRequest, SamplingFields
from service.deps import Gateway
from service.registry import Registry, ServedModel
from service.settings import GatewaySettings


def field_error(field: str, msg: str, value: Any = None, kind: str = "value_error", where: str = "body",
                **ctx: Any):
    """A 422 in pydantic's own shape, for limits that only the deployment knows."""
    return RequestValidationError([{"type": kind, "loc": (where, field), "msg": msg, "input": value,
                                    "ctx": ctx}])


def resolve_model(registry: Registry, name: str | None) -> ServedModel:
    model = registry.get(name)
    if model is None:
        raise field_error("model", f"unknown model {name!r}; served: {sorted(registry.models)}", name)
    return model


def sampling(model: ServedModel, fields: SamplingFields, settings: GatewaySettings) -> contract.Sampling:
    values = {k: (v if (v := getattr(fields, k)) is not None else model.defaults[k]) for k in model.defaults}
    for name in ("max_new_tokens", "max_denoising_steps"):  # deployment limits
        limit = getattr(settings, name)
        if values[name] > limit:
            raise field_error(name, f"Input should be less than or equal to {limit}", values[name],
                              "less_than_equal", le=limit)
    if (problem := contract.temperature_problem(values["t_min"], values["t_max"])) is not None:
        raise field_error("t_max", problem, values["t_max"])
    seed = fields.seed if fields.seed is not None else secrets.randbits(63)
    return contract.Sampling(seed=seed, eos_token_ids=model.eos_token_ids, **values)


def prompt_ids(model: ServedModel, body: GenerateRequest, settings: GatewaySettings) -> tuple[list[int], str]:
    """The prompt's token ids, and the field they came from."""
    if body.messages is not None:
        ids = model.encode_messages([m.model_dump() for m in body.messages])
        field = "messages"
    else:
        ids = model.encode_prompt(body.prompt or "")
        field = "prompt"
    if len(ids) > settings.max_prompt_tokens:
        raise field_error(field, f"prompt is {len(ids)} tokens; the limit is {settings.max_prompt_tokens}",
                          None, "too_long", max_tokens=settings.max_prompt_tokens)
    return ids, field


def check_context(model: ServedModel, ids: list[int], field: str, params: contract.Sampling,
                  limit: int | None) -> None:
    """A request must fit the context of a live worker for its model (`limit`: the largest; None: unknown, as
    while no worker runs: the request waits for one)."""
    needed = contract.context_needed(len(ids), params.max_new_tokens, model.canvas_length)
    if limit is None or needed <= limit:
        return
    culprit = field if len(ids) + model.canvas_length > limit else "max_new_tokens"
    raise field_error(culprit, f"the prompt ({len(ids)} tokens) and max_new_tokens rounded up to whole canvases "
                      f"need {needed} positions; the largest context of a live worker for model {model.name!r} "
                      f"is {limit}", None, "too_long", max_context=limit)


def attempt_seed(base: int, attempt: int) -> int:
    """The seed of the `attempt`-th sample (n > 1, Sudoku attempts) of a request seeded `base`: consecutive,
    wrapping within the 63 bits a seed has."""
    return (base + attempt) % 2**63


def template_ids(model: ServedModel, body: GenerateRequest) -> dict[int, int] | None:
    """The canvas template as position -> token id. Text templates need one token per character."""
    template = body.template
    if template is None:
        return None
    L = model.canvas_length
    if len(template) > L:
        raise field_error("template", f"template has {len(template)} positions; the canvas has {L}",
                          None, "too_long", max_length=L)
    vocab = len(model.tokenizer)
    out: dict[int, int] = {}
    if isinstance(template, str):
        for pos, ch in enumerate(template):
            if ch == body.template_hole:
                continue
            tok = model.token_id(ch)
            if tok is None:
                raise field_error("template", f"character {ch!r} at position {pos} is not one token of model "
                                  f"{model.name!r}; give token ids instead", None)
            out[pos] = tok
    else:
        for pos, tok in enumerate(template):
            if tok is None:
                continue
            if not 0 <= tok < vocab:
                raise field_error("template", f"token id {tok} at position {pos} is outside the vocabulary "
                                  f"(0..{vocab - 1})", tok)
            out[pos] = tok
    return out


def build_job(gateway: Gateway, body: GenerateRequest, stop: list[str] | None = None) -> contract.Job:
    settings = gateway.settings
    model = resolve_model(gateway.registry, body.model)
    params = sampling(model, body, settings)
    ids, field = prompt_ids(model, body, settings)
    check_context(model, ids, field, params, gateway.worker_context.get(model.name))
    created = time.time()
    return contract.Job(
        request_id=uuid.uuid4().hex, model=model.name, prompt_ids=ids, sampling=params,
        template=template_ids(model, body), stop=stop or [], created_at=created,
        deadline=created + settings.request_timeout_s, max_steps=settings.max_request_steps,
        max_running_s=settings.max_running_s,
    )


def build_samples(gateway: Gateway, body: GenerateRequest, n: int, stop: list[str] | None = None
                  ) -> list[contract.Job]:
    """`n` samples of one request (n > 1, Sudoku attempts): tokenized and checked once, each its own request
    with the seed `attempt_seed(body.seed, i)` (a random one each when the body has none)."""
    first = build_job(gateway, body, stop)
    jobs = [first]
    for i in range(1, n):
        seed = secrets.randbits(63) if body.seed is None else attempt_seed(body.seed, i)
        jobs.append(first.model_copy(update={"request_id": uuid.uuid4().hex,
                                             "sampling": first.sampling.model_copy(update={"seed": seed})}))
    return jobs
