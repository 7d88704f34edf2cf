"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions.

Non-streaming and Server-Sent Events streaming (OpenAI chunks, ending with `data: [DONE]`). Without
`diffusing`, chunks carry committed text only (one per committed canvas), as ordinary clients expect.
With `"diffusing": true` (Mercury's field), every denoising step sends a chunk whose content is the whole
text so far (committed text + the current draft of the canvas) and replaces the previous one; the
choice's `diffusion` object marks what is committed and what is still a draft.

Errors use OpenAI's error object: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from protocol import contract
from service.broker import Overloaded
from service.deps import ApiKey, Caller, Gateway, GatewayDep
from service.follow import ERROR_STATUS, expire_at, submit_all, wait_final
from service.jobs import attempt_seed, build_job
from service.openai_schemas import UNSUPPORTED, ChatRequest, CompletionRequest
from service.schemas import GenerateRequest
from service.strictjson import StrictRoute, printable

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[ApiKey], route_class=StrictRoute)

FINISH = {"stop": "stop", "stop_string": "stop", "length": "length"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_from_validation(errors: list[dict]) -> OpenAIError:
    first = errors[0]
    loc = [printable(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return OpenAIError(400, f"{param + ': ' if param else ''}{printable(first['msg'])}", param=param,
                       code="invalid_value")


async def parse(request: Request, model_cls):
    raw = await request.json()  # strict (service.strictjson): JsonProblem and 415 answer in OpenAI's shape
    if not isinstance(raw, dict):
        raise OpenAIError(400, "request body must be a JSON object")
    for name in raw:
        if name in UNSUPPORTED:
            raise OpenAIError(400, f"`{name}` is not supported: {UNSUPPORTED[name]}", param=name,
                              code="unsupported_parameter")
    try:
        return model_cls.model_validate(raw)
    except ValidationError as exc:
        raise error_from_validation(exc.errors()) from None


def _jobs(gateway: Gateway, body, prompt: str | None, messages: list[dict] | None, max_tokens: int | None):
    if gateway.registry.get(body.model) is None:
        raise OpenAIError(404, f"The model `{body.model}` does not exist; served: {sorted(gateway.registry.models)}",
                          param="model", code="model_not_found")
    base = body.diffusion_params()
    jobs = []
    for i in range(body.n):
        params = {**base, "seed": attempt_seed(base["seed"], i)} if "seed" in base else base
        try:
            generate = GenerateRequest(prompt=prompt, messages=messages, model=body.model, max_new_tokens=max_tokens,
                                       **params)
            jobs.append(build_job(gateway, generate, stop=body.stop))
        except ValidationError as exc:
            raise error_from_validation(exc.errors()) from None
        except RequestValidationError as exc:
            raise error_from_validation(list(exc.errors())) from None
    return jobs


async def _submit(gateway: Gateway, jobs: list[contract.Job], tenant: str) -> None:
    try:
        await submit_all(gateway, jobs, tenant)
    except Overloaded as exc:
        gateway.metrics.rejected.labels("overloaded").inc()
        raise OpenAIError(429, f"server overloaded: {exc}", type_="rate_limit_error", code="overloaded",
                          headers={"Retry-After": str(gateway.settings.retry_after_s)}) from None


def _usage(jobs: list[contract.Job], finals: list[contract.Done]) -> dict[str, Any]:
    completion = sum(f.usage.completion_tokens for f in finals)
    steps = sum(f.usage.denoising_steps for f in finals)
    prompt = len(jobs[0].prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "canvases": sum(f.usage.canvases for f in finals), "denoising_steps": steps,
            "tokens_per_forward": round(completion / max(steps, 1), 4)}


def _raise_error(final: contract.Error) -> None:
    status = ERROR_STATUS.get(final.code, 500)
    status = 400 if status == 422 else status  # OpenAI answers invalid requests with 400
    kind = "invalid_request_error" if status < 500 else "server_error"
    raise OpenAIError(status, final.message, type_=kind, code=final.code)


async def _complete(request: Request, gateway: Gateway, jobs: list[contract.Job]) -> list[contract.Done]:
    finals = await asyncio.gather(*(wait_final(gateway, j.request_id, j.model, request.is_disconnected, j.deadline)
                                    for j in jobs))
    for final in finals:
        if final.type == "error":
            _raise_error(final)
    return list(finals)  # type: ignore[arg-type]


async def _events(gateway: Gateway, jobs: list[contract.Job], body_diffusing: bool
                  ) -> AsyncIterator[tuple[int, contract.BaseModel]]:
    """The events of n requests, merged, tagged with their choice index (steps only when diffusing)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, job: contract.Job) -> None:
        expiry = asyncio.create_task(expire_at(gateway, job.request_id, job.deadline))
        try:
            async for _, raw in gateway.broker.events(job.request_id):
                if raw.type != "step" or body_diffusing:  # plain streams skip parsing every step
                    await queue.put((index, raw.parse()))
        except Exception:  # never a silent end: the client gets an error for this choice
            log.exception("following %s failed", job.request_id)
            await queue.put((index, contract.Error(request_id=job.request_id, code="internal_error",
                                                   message="the gateway could not follow this request")))
            await gateway.broker.cancel(job.request_id)
        finally:
            expiry.cancel()
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, j)) for i, j in enumerate(jobs)]
    open_ = len(jobs)
    try:
        while open_:
            index, event = await queue.get()
            if event is None:
                open_ -= 1
                continue
            yield index, event
    finally:
        for t in tasks:
            t.cancel()


def _sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def _stream(gateway: Gateway, jobs: list[contract.Job], body, chat: bool) -> StreamingResponse:
    cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None = None, extra: dict | None = None,
              first: bool = False) -> dict:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        if extra:
            choice["diffusion"] = extra
        return {"id": cid, "object": obj, "created": created, "model": body.model, "choices": [choice]}

    async def generate() -> AsyncIterator[bytes]:
        committed = [""] * len(jobs)
        finals: dict[int, contract.Done] = {}
        ended: set[int] = set()
        try:
            if chat:
                for i in range(len(jobs)):
                    yield _sse(chunk(i, "", first=True))
            async for index, event in _events(gateway, jobs, body.diffusing):
                if event.type == "restarted":
                    committed[index] = ""
                    if body.diffusing:
                        yield _sse(chunk(index, "", extra={"committed": "", "draft": "", "restarted": True}))
                elif event.type == "step" and body.diffusing:
                    extra = {"committed": committed[index], "draft": event.draft_text, "canvas": event.canvas,
                             "step": event.step, "accepted": event.accepted, "mean_entropy": event.mean_entropy}
                    yield _sse(chunk(index, committed[index] + event.draft_text, extra=extra))
                elif event.type == "canvas":
                    committed[index] += event.text
                    if body.diffusing:
                        extra = {"committed": committed[index], "draft": "", "canvas": event.canvas,
                                 "committed_canvas": True}
                        yield _sse(chunk(index, committed[index], extra=extra))
                    elif event.text:
                        yield _sse(chunk(index, event.text))
                elif event.type == "done":
                    finals[index] = event
                    ended.add(index)
                    text = event.text if body.diffusing else None
                    extra = {"committed": event.text, "draft": ""} if body.diffusing else None
                    yield _sse(chunk(index, text, FINISH[event.finish_reason], extra=extra))
                elif event.type == "error":
                    ended.add(index)
                    err = OpenAIError(500, event.message, type_="server_error", code=event.code)
                    yield _sse(err.body())
            if body.include_usage and len(finals) == len(jobs):
                usage = _usage(jobs, [finals[i] for i in range(len(jobs))])
                yield _sse({"id": cid, "object": obj, "created": created, "model": body.model, "choices": [],
                            "usage": usage})
            yield _sse("[DONE]")
        finally:  # the client left before the end: cancel what is still running
            for i, job in enumerate(jobs):
                if i not in ended:
                    await gateway.client_left(job.request_id)

    return StreamingResponse(generate(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/models")
async def list_models(gateway: GatewayDep) -> dict:
    now = int(time.time())
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": now, "owned_by": "dgserve", "canvas_length": m.canvas_length}
        for name, m in gateway.registry.models.items()]}


async def _serve(request: Request, gateway: Gateway, tenant: str, body, prompt: str | None,
                 messages: list[dict] | None, max_tokens: int | None, chat: bool):
    """Queue the n completions, then stream them or answer once all are done."""
    try:
        jobs = await run_in_threadpool(_jobs, gateway, body, prompt, messages, max_tokens)
        await _submit(gateway, jobs, tenant)
        if body.stream:
            return _stream(gateway, jobs, body, chat=chat)
        finals = await _complete(request, gateway, jobs)
    except OpenAIError as exc:
        return exc.response()
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": f.text},
                    "finish_reason": FINISH[f.finish_reason], "logprobs": None} for i, f in enumerate(finals)]
    else:
        choices = [{"index": i, "text": f.text, "finish_reason": FINISH[f.finish_reason], "logprobs": None}
                   for i, f in enumerate(finals)]
    return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.model, "usage": _usage(jobs, finals), "choices": choices}


@router.post("/completions")
async def completions(request: Request, gateway: GatewayDep, tenant: Caller):
    try:
        body: CompletionRequest = await parse(request, CompletionRequest)
    except OpenAIError as exc:
        return exc.response()
    return await _serve(request, gateway, tenant, body, body.prompt, None, body.max_tokens, chat=False)


@router.post("/chat/completions")
async def chat_completions(request: Request, gateway: GatewayDep, tenant: Caller):
    try:
        body: ChatRequest = await parse(request, ChatRequest)
    except OpenAIError as exc:
        return exc.response()
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    return await _serve(request, gateway, tenant, body, None, messages, body.max_completion_tokens or body.max_tokens,
                        chat=True)
