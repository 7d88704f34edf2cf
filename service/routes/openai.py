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
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from protocol import contract
from protocol.api import GenerateRequest
from service.broker import Overloaded
from service.deps import ApiKey, Caller, Gateway, GatewayDep
from service.edge import field_errors
from service.follow import ERROR_STATUS, Follower
from service.jobs import build_samples
from service.openai_schemas import UNSUPPORTED, ChatRequest, CompletionRequest
from service.strictjson import StrictRoute

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
    """OpenAI's error for the first of pydantic's errors, `param` the field it names."""
    [first] = field_errors(errors[:1])
    return OpenAIError(400, f"{first.field}: {first.message}" if first.field else first.message, param=first.field,
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
    try:
        generate = GenerateRequest(prompt=prompt, messages=messages, model=body.model, max_new_tokens=max_tokens,
                                   **body.diffusion_params())
        return build_samples(gateway, generate, body.n, stop=body.stop)
    except ValidationError as exc:
        raise error_from_validation(exc.errors()) from None
    except RequestValidationError as exc:
        raise error_from_validation(list(exc.errors())) from None


async def _submit(follower: Follower, jobs: list[contract.Job]) -> list[str]:
    try:
        return await follower.submit(jobs)
    except Overloaded as exc:
        gateway = follower.gateway
        gateway.metrics.rejected.labels("overloaded").inc()
        raise OpenAIError(429, f"server overloaded: {exc}", type_="rate_limit_error", code="overloaded",
                          headers={"Retry-After": str(gateway.settings.retry_after_s)}) from None


def _usage(finals: list[contract.Done]) -> dict[str, Any]:
    """OpenAI's usage (with `total_tokens`) of the n choices of one prompt."""
    usage = contract.Usage.total([f.usage for f in finals])
    return {**usage.model_dump(), "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def _raise_error(final: contract.Error) -> None:
    status = ERROR_STATUS.get(final.code, 500)
    status = 400 if status == 422 else status  # OpenAI answers invalid requests with 400
    kind = "invalid_request_error" if status < 500 else "server_error"
    raise OpenAIError(status, final.message, type_=kind, code=final.code)


async def _complete(request: Request, follower: Follower, rids: list[str]) -> list[contract.Done]:
    finals = await asyncio.gather(*(follower.final(rid, request.is_disconnected) for rid in rids))
    for final in finals:
        if final.type == "error":
            _raise_error(final)
    return list(finals)  # type: ignore[arg-type]


def _sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def _stream(follower: Follower, rids: list[str], body, chat: bool) -> StreamingResponse:
    """The n choices as Server-Sent Events; when the stream ends, however it ends (the client may leave), the
    follower cancels what is still running."""
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
        committed = [""] * len(rids)
        finals: dict[int, contract.Done] = {}
        try:
            if chat:
                for i in range(len(rids)):
                    yield _sse(chunk(i, "", first=True))
            async for index, event in follower.merged(rids, steps=body.diffusing):  # plain streams skip the steps
                if event.type == "restarted":
                    committed[index] = ""
                    if body.diffusing:
                        yield _sse(chunk(index, "", extra={"committed": "", "draft": "", "restarted": True}))
                elif event.type == "step":
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
                    text = event.text if body.diffusing else None
                    extra = {"committed": event.text, "draft": ""} if body.diffusing else None
                    yield _sse(chunk(index, text, FINISH[event.finish_reason], extra=extra))
                elif event.type == "error":
                    yield _sse(OpenAIError(500, event.message, type_="server_error", code=event.code).body())
            if body.include_usage and len(finals) == len(rids):
                usage = _usage([finals[i] for i in range(len(rids))])
                yield _sse({"id": cid, "object": obj, "created": created, "model": body.model, "choices": [],
                            "usage": usage})
            yield _sse("[DONE]")
        finally:  # however the stream ended: cancel what still runs (the client left)
            await follower.close()

    return StreamingResponse(generate(), media_type="text/event-stream", background=BackgroundTask(follower.close),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/models")
async def list_models(gateway: GatewayDep) -> dict:
    now = int(time.time())
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": now, "owned_by": "dgserve", "canvas_length": m.canvas_length}
        for name, m in gateway.registry.models.items()]}


def _inputs(body: CompletionRequest | ChatRequest) -> tuple[str | None, list[dict] | None, int | None]:
    """The prompt or the messages of a body, and its token limit."""
    if isinstance(body, CompletionRequest):
        return body.prompt, None, body.max_tokens  # type: ignore[return-value]
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    return None, messages, body.max_completion_tokens or body.max_tokens


async def _serve(request: Request, gateway: Gateway, tenant: str, model_cls: type[CompletionRequest | ChatRequest]):
    """Queue the n completions, then stream them or answer once all are done."""
    chat = model_cls is ChatRequest
    follower = Follower(gateway, tenant)
    try:
        body = await parse(request, model_cls)
        jobs = await run_in_threadpool(_jobs, gateway, body, *_inputs(body))
        rids = await _submit(follower, jobs)
        if body.stream:
            return _stream(follower, rids, body, chat=chat)  # it closes the follower when it ends
        async with follower:
            finals = await _complete(request, follower, rids)
    except OpenAIError as exc:
        await follower.close()
        return exc.response()
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": f.text},
                    "finish_reason": FINISH[f.finish_reason], "logprobs": None} for i, f in enumerate(finals)]
    else:
        choices = [{"index": i, "text": f.text, "finish_reason": FINISH[f.finish_reason], "logprobs": None}
                   for i, f in enumerate(finals)]
    return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.model, "usage": _usage(finals), "choices": choices}


@router.post("/completions")
async def completions(request: Request, gateway: GatewayDep, tenant: Caller):
    return await _serve(request, gateway, tenant, CompletionRequest)


@router.post("/chat/completions")
async def chat_completions(request: Request, gateway: GatewayDep, tenant: Caller):
    return await _serve(request, gateway, tenant, ChatRequest)
