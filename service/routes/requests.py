"""GET /requests/{request_id}/events: a request's events again, from an offset (after a dropped connection or a
gateway restart), as Server-Sent Events. Reading never cancels: leaving this stream leaves the request running."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Path, Query
from fastapi.responses import StreamingResponse

from service.deps import ApiKey, Caller, GatewayDep

router = APIRouter(tags=["requests"], dependencies=[ApiKey])
MAX_OFFSET = 10_000_000


@router.get("/requests/{request_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "`id:` the event's offset, `data:` the event as the WebSocket sends it"},
                       401: {"description": "missing or invalid API key"},
                       404: {"description": "no such request of this caller is kept (24 h)"}})
async def request_events(
    request_id: Annotated[str, Path(min_length=1, max_length=128)],
    gateway: GatewayDep,
    tenant: Caller,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="events the client already has")] = 0,
    last_event_id: Annotated[int | None, Header(ge=0, lt=MAX_OFFSET)] = None,
):
    """Every event of one of the caller's requests after the first `offset`, ending after its final one. A
    reconnecting EventSource sends Last-Event-ID, which resumes after that event. Events are kept an hour after
    the request's last one; past that the stream is one `expired` error."""
    if await gateway.broker.owner(request_id) != tenant:  # another caller's request is as unknown as none
        raise HTTPException(status_code=404, detail=f"no request {request_id!r} of yours is kept here")
    start = offset if last_event_id is None else last_event_id + 1

    async def sse() -> AsyncIterator[bytes]:
        index = start
        async for _, event in gateway.broker.events_from(request_id, start):
            yield f"id: {index}\ndata: {event.text}\n\n".encode()
            index += 1

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
