"""WebSocket clients: each sends its requests one after another and times every event of each."""

from __future__ import annotations

import asyncio
import json
import time

from bench.serving.workload import Record, Req


async def _client(ws_url: str, reqs: list[Req], model: str | None, start: asyncio.Event, t0: list[float],
                  records: list[Record], timeout: float, compression: str | None, progress) -> None:
    import websockets

    try:
        ws = await websockets.connect(ws_url, max_size=None, compression=compression, open_timeout=30)
    except Exception as exc:  # noqa: BLE001
        await start.wait()
        for r in reqs:
            records.append(Record(r.client, r.index, r.ref, r.seed, error=f"connect_failed: {exc!r}"[:200]))
        return
    try:
        await start.wait()
        for r in reqs:
            rec = Record(r.client, r.index, r.ref, r.seed)
            records.append(rec)
            body = {"type": "generate", "prompt": r.prompt, "seed": r.seed, "max_new_tokens": r.max_new_tokens,
                    "max_denoising_steps": r.steps, "ref": r.ref}
            if model:
                body["model"] = model
            sent = time.perf_counter()
            rec.sent_s = sent - t0[0]
            try:
                await ws.send(json.dumps(body))
                while True:
                    raw = await asyncio.wait_for(ws.recv(), timeout)
                    now = time.perf_counter() - sent
                    ev = json.loads(raw)
                    kind = ev.get("type")
                    if kind == "step":
                        rec.on_step(now, ev["canvas"], ev["step"])
                    elif kind == "canvas":
                        rec.on_canvas(now)
                    elif kind == "queued":
                        rec.queued_s, rec.prompt_tokens = now, ev.get("prompt_tokens")
                        if ev.get("ref") != r.ref:
                            rec.error = f"ref_mismatch: {ev.get('ref')!r}"
                    elif kind == "done":
                        rec.on_done(now, ev["token_ids"], ev["usage"]["completion_tokens"],
                                    ev["usage"]["denoising_steps"], ev["finish_reason"])
                        break
                    elif kind == "error":
                        rec.on_error(now, ev.get("code"), ev.get("message"))
                        break
                    elif kind == "restarted":
                        rec.on_restarted()
            except TimeoutError:
                rec.error = f"client_timeout: no event for {timeout}s"
                break
            except websockets.ConnectionClosed as exc:
                rec.error = f"connection_closed: {exc}"[:300]
                break
            finally:
                progress(rec)
    finally:
        await ws.close()
    for r in reqs[len([x for x in records if x.client == reqs[0].client]):]:
        records.append(Record(r.client, r.index, r.ref, r.seed, error="not_sent: the connection failed earlier"))


async def run_clients(ws_url: str, reqs: list[Req], model: str | None, timeout: float, compression: str | None,
                      label: str, quiet: bool = False, on_start=None) -> tuple[list[Record], float]:
    """Connect every client first, then start them together; returns the records and the run's wall time."""
    by_client: dict[int, list[Req]] = {}
    for r in reqs:
        by_client.setdefault(r.client, []).append(r)
    records: list[Record] = []
    start, t0 = asyncio.Event(), [0.0]
    progress = progress_printer(label, len(reqs), quiet)
    tasks = [asyncio.create_task(_client(ws_url, rs, model, start, t0, records, timeout, compression, progress))
             for rs in by_client.values()]
    await asyncio.sleep(0.5)  # let the connections open (also timed out by open_timeout)
    if on_start:
        on_start()
    t0[0] = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    return sorted(records, key=lambda r: (r.client, r.index)), time.perf_counter() - t0[0]


def progress_printer(label: str, total: int, quiet: bool):
    state = {"n": 0}
    every = max(1, total // 16)

    def report(rec: Record) -> None:
        state["n"] += 1
        n = state["n"]
        if not quiet and (n % every == 0 or n == total or rec.error):
            what = f"e2e {rec.e2e_s:.2f}s, {len(rec.step_times_s)} steps" if rec.error is None else rec.error
            print(f"  [{label}] {n}/{total} {rec.ref}: {what}", flush=True)

    return report
