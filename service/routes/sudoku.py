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
from pydantic import BaseModel, Field, field_validator

from protocol import contract
from protocol.sudoku import canvas_cells, is_valid_solution, normalize_puzzle, problems
from service.deps import ApiKey, Caller, Gateway, GatewayDep
from service.follow import error_response, submit_all, wait_final
from service.jobs import attempt_seed, build_job
from service.schemas import DiffusionFields, GenerateRequest
from service.strictjson import StrictRoute

router = APIRouter(tags=["sudoku"], dependencies=[ApiKey], route_class=StrictRoute)


class SudokuRequest(DiffusionFields):
    puzzle: str = Field(description="81 cells row by row, digits 1-9, `0` or `.` for blanks", max_length=400)
    model: str = Field("sudoku", min_length=1, max_length=128)
    attempts: int = Field(8, ge=1, le=32, description="samples run side by side; the first valid one wins")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @field_validator("puzzle")
    @classmethod
    def _puzzle(cls, value: str) -> str:
        puzzle = normalize_puzzle(value)  # ValueError -> 422 naming `puzzle`
        conflicts = [p for p in problems(puzzle, puzzle.replace("0", "."), limit=9) if "repeats" in p]
        if conflicts:
            raise ValueError(f"the givens conflict: {'; '.join(conflicts)}")
        return puzzle


class SudokuResponse(BaseModel):
    request_id: str
    puzzle: str
    solution: str
    valid: bool
    problems: list[str]
    attempts: int
    attempt: int
    steps: int
    total_steps: int


def sudoku_jobs(gateway: Gateway, body: SudokuRequest) -> list[contract.Job]:
    jobs = []
    for i in range(body.attempts):
        seed = None if body.seed is None else attempt_seed(body.seed, i)
        diffusion = body.model_dump(include=set(DiffusionFields.model_fields))
        generate = GenerateRequest(prompt=body.puzzle, model=body.model, template=body.puzzle, template_hole="0",
                                   max_new_tokens=81, seed=seed, **diffusion)
        jobs.append(build_job(gateway, generate))
    return jobs


def verdict(puzzle: str, final: contract.Done) -> tuple[str, bool, list[str]]:
    solution = canvas_cells(puzzle, final.text, final.token_ids)
    valid = is_valid_solution(puzzle, solution)
    return solution, valid, [] if valid else problems(puzzle, solution, limit=20)


async def solve(gateway: Gateway, body: SudokuRequest, jobs: list[contract.Job], disconnected
                ) -> SudokuResponse | contract.Error:
    """Wait for the attempts; the first valid solution wins and cancels the rest (else the one with the
    fewest problems)."""

    async def attempt(i: int, job: contract.Job):
        return i, await wait_final(gateway, job.request_id, job.model, disconnected, job.deadline)

    tasks = [asyncio.create_task(attempt(i, j)) for i, j in enumerate(jobs)]
    best: tuple[int, int, contract.Done] | None = None  # (problems, attempt, final)
    total_steps, error = 0, None
    try:
        for next_done in asyncio.as_completed(tasks):
            i, final = await next_done
            if final.type == "error":
                error = error or final
                continue
            total_steps += final.usage.denoising_steps
            _, valid, found = verdict(body.puzzle, final)
            if best is None or len(found) < best[0]:
                best = (len(found), i, final)
            if valid:
                break
    finally:
        for task, job in zip(tasks, jobs, strict=True):
            if not task.done():
                task.cancel()
                await gateway.broker.cancel(job.request_id)
    if best is None:
        assert error is not None
        return error
    _, i, final = best
    solution, valid, found = verdict(body.puzzle, final)
    return SudokuResponse(request_id=final.request_id, puzzle=body.puzzle, solution=solution, valid=valid,
                          problems=found, attempts=body.attempts, attempt=i, steps=final.usage.denoising_steps,
                          total_steps=total_steps)


@router.post("/sudoku", response_model=SudokuResponse,
             responses={422: {"description": "malformed puzzle: the problem is named"},
                        429: {"description": "queue full; retry after Retry-After seconds"}})
async def sudoku(body: SudokuRequest, request: Request, gateway: GatewayDep, tenant: Caller):
    jobs = await run_in_threadpool(sudoku_jobs, gateway, body)
    await submit_all(gateway, jobs, tenant)
    result = await solve(gateway, body, jobs, request.is_disconnected)
    if isinstance(result, contract.Error):
        return error_response(result)
    return result
