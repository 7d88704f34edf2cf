"""POST /sudoku: a Sudoku through the sudoku checkpoint, givens clamped by the canvas template.

A Sudoku is a `generate` whose prompt is the puzzle (81 characters, `0` for blanks) and whose canvas
template is the puzzle too (the givens are fixed positions, never renoised). Several attempts with
different seeds run side by side in the same batched steps; the first valid solution wins (the others
are cancelled), and a constraint check that cannot be fooled says whether it is valid.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from protocol import contract
from protocol.api import DiffusionFields, GenerateRequest, SudokuRequest, SudokuResponse
from service.deps import ApiKey, Caller, Gateway, GatewayDep
from service.follow import Disconnected, Follower, error_response
from service.jobs import build_samples
from service.strictjson import StrictRoute

router = APIRouter(tags=["sudoku"], dependencies=[ApiKey], route_class=StrictRoute)


def sudoku_jobs(gateway: Gateway, body: SudokuRequest) -> list[contract.Job]:
    diffusion = body.model_dump(include=set(DiffusionFields.model_fields))
    generate = GenerateRequest(prompt=body.puzzle, model=body.model, template=body.puzzle, template_hole="0",
                               max_new_tokens=81, seed=body.seed, **diffusion)
    return build_samples(gateway, generate, body.attempts)


async def solve(follower: Follower, body: SudokuRequest, rids: list[str], disconnected: Disconnected
                ) -> SudokuResponse | contract.Error:
    """Wait for the attempts; the first valid solution wins and cancels the rest (else the one with the
    fewest problems)."""

    async def attempt(i: int, rid: str) -> tuple[int, contract.Done | contract.Error]:
        return i, await follower.final(rid, disconnected)

    tasks = [asyncio.create_task(attempt(i, rid)) for i, rid in enumerate(rids)]
    best: SudokuResponse | None = None
    total_steps, error = 0, None
    try:
        for next_done in asyncio.as_completed(tasks):
            i, final = await next_done
            if final.type == "error":
                error = error or final
                continue
            total_steps += final.usage.denoising_steps
            judged = SudokuResponse.judge(body.puzzle, final, body.attempts, i)
            if best is None or len(judged.problems) < len(best.problems):
                best = judged
            if judged.valid:
                break
    finally:
        for task, rid in zip(tasks, rids, strict=True):
            if not task.done():
                task.cancel()
                await follower.cancel(rid)
    if best is None:
        assert error is not None
        return error
    return best.model_copy(update={"total_steps": total_steps})


@router.post("/sudoku", response_model=SudokuResponse,
             responses={422: {"description": "malformed puzzle: the problem is named"},
                        429: {"description": "queue full; retry after Retry-After seconds"}})
async def sudoku(body: SudokuRequest, request: Request, gateway: GatewayDep, tenant: Caller):
    jobs = await run_in_threadpool(sudoku_jobs, gateway, body)
    async with Follower(gateway, tenant) as follower:
        rids = await follower.submit(jobs)
        result = await solve(follower, body, rids, request.is_disconnected)
    if isinstance(result, contract.Error):
        return error_response(result)
    return result
