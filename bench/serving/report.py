"""The report: per-mode summaries pooled over runs, the service/engine ratios, where the service's time goes, the
JSON, the plot and the printout."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.serving.procstat import thread_time_split
from bench.serving.workload import Record

DIAGNOSTIC = "engine+publisher"  # the engine mode with the worker's publisher beside it (bench/serve.py --diagnose)
METRICS = ("queued_s", "first_step_s", "step_interval_s", "first_canvas_s", "e2e_s")


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1)."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


def dist(values: list[float]) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"n": 0}
    r = lambda x: round(x, 5)  # noqa: E731
    return {"n": len(v), "p50": r(pct(v, 0.5)), "p90": r(pct(v, 0.9)), "p99": r(pct(v, 0.99)),
            "mean": r(statistics.fmean(v)), "max": r(max(v))}


def summarize(name: str, records: list[Record], runs: list[tuple[float, int]], extra: dict | None = None) -> dict:
    """Pooled over the runs: percentiles over every request (or step gap), tok/s = tokens / summed wall time."""
    ok = [r for r in records if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    wall_s = sum(w for w, _ in runs)
    received = sum(len(r.step_times_s) for r in records)
    expected = sum(r.steps_expected or 0 for r in ok)
    return {
        "name": name, "requests": len(records), "completed": len(ok),
        "errors": dict(Counter(r.error.split(":")[0] for r in records if r.error)),
        "wall_s": round(wall_s, 4), "completion_tokens": tokens,
        "tok_s": round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        "runs": [{"wall_s": round(w, 4), "tokens": n, "tok_s": round(n / w, 2) if w > 0 else 0.0} for w, n in runs],
        "queued_s": dist([r.queued_s for r in ok]),
        "first_step_s": dist([r.first_step_s for r in ok]),
        "step_interval_s": dist([g for r in ok for g in r.step_gaps_s]),
        "first_canvas_s": dist([r.first_canvas_s for r in ok]),
        "e2e_s": dist([r.e2e_s for r in ok]),
        "step_events": {"received": received, "expected": expected,
                        "missing": sum(max(0, (r.steps_expected or 0) - len(r.step_times_s)) for r in ok),
                        "requests_with_missing": [f"{r.ref}#{r.run}" for r in ok
                                                  if len(r.step_times_s) != r.steps_expected],
                        "out_of_order": [f"{r.ref}#{r.run}" for r in ok if not r.steps_in_order]},
        "finish_reasons": dict(Counter(r.finish_reason for r in ok)),
        **(extra or {}),
    }


def engine_steps(steps: int, mean_rows: float, busy_s: float, wall_s: float, thread_cpu_s: float | None = None,
                 sched: Sequence[float] | None = None) -> dict:
    """A mode's engine loop, the same figures for both (`analyse` compares them): its steps, their rows and time, how
    busy it kept the run, and its thread's CPU seconds (`sched`: wall, on a CPU, waiting for a core)."""
    out = {"steps": steps, "mean_rows": round(mean_rows, 2), "step_time_ms_mean": round(busy_s / steps * 1e3, 3),
           "engine_busy_s": round(busy_s, 3), "engine_busy_share_of_wall": round(busy_s / wall_s, 3)}
    if thread_cpu_s is not None:
        out["engine_thread_cpu_s"] = round(thread_cpu_s, 3)
        out["engine_thread_on_cpu_share_of_busy"] = round(thread_cpu_s / busy_s, 3)
    if sched is not None:
        out["engine_thread_schedstat"] = thread_time_split(*sched)
    return out


def same_tokens(records: dict[str, list[Record]]) -> dict:
    """Every run of every mode against the engine's first run (or the first mode's), request by request."""
    runs = {(m, r.run) for m, recs in records.items() for r in recs}
    ref_mode = "engine" if "engine" in records else next(iter(records))
    reference = {r.ref: r.token_ids for r in records[ref_mode] if r.run == 0 and r.error is None}
    compared, mismatched = 0, []
    for mode, recs in records.items():
        for r in recs:
            if r.error is None and r.ref in reference and not (mode == ref_mode and r.run == 0):
                compared += 1
                if r.token_ids != reference[r.ref]:
                    mismatched.append(f"{mode}#{r.run}:{r.ref}")
    return {"reference": f"{ref_mode} run 0", "runs": len(runs), "compared": compared,
            "identical": compared - len(mismatched), "mismatched": mismatched,
            "all_identical": compared > 0 and not mismatched}


def ratios(svc: dict, eng: dict) -> dict:
    def inv(key: str, q: str = "p50") -> float | None:
        s, e = svc[key].get(q), eng[key].get(q)
        return round(e / s, 3) if s and e else None

    pairs = [round(s["tok_s"] / e["tok_s"], 3) for s, e in zip(svc["runs"], eng["runs"], strict=False) if e["tok_s"]]
    return {"tok_s_service_over_engine": round(svc["tok_s"] / eng["tok_s"], 3) if eng["tok_s"] else None,
            "tok_s_service_over_engine_per_run": pairs,
            "e2e_p50_engine_over_service": inv("e2e_s"),
            "e2e_p99_engine_over_service": inv("e2e_s", "p99"),
            "first_step_p50_engine_over_service": inv("first_step_s"),
            "step_interval_p50_engine_over_service": inv("step_interval_s"),
            "goal": 0.85}


def analyse(out: dict) -> list[str]:
    """Where the service's time goes, in numbers (printed, and kept in the JSON)."""
    svc, eng = out["modes"].get("service"), out["modes"].get("engine")
    if not svc or not eng:
        return []
    notes = []
    busy = [f"{m} run {i + 1} ({r['engine_thread_waiting_for_a_core_share'] * 100:.0f}%)"
            for m, s in out["modes"].items() for i, r in enumerate(s["runs"])
            if r.get("engine_thread_waiting_for_a_core_share", 0) > 0.1]
    if busy:
        notes.append("the engine loop's thread waited for a core during " + ", ".join(busy) + " (share of the "
                     "run): other runnable threads outnumbered the cores, the service's own (gateway, Redis, clients, "
                     "worker threads) or, in the engine modes necessarily, other work on the machine; ratios from "
                     "such engine runs are unreliable")
    w, e = svc.get("worker"), eng.get("engine")
    if w and e:
        notes.append(
            f"engine steps: in the service {w['steps']} steps of {w['mean_rows']} rows, {w['step_time_ms_mean']} ms "
            f"each (busy {w['engine_busy_s']}s = {w['engine_busy_share_of_wall'] * 100:.0f}% of {svc['wall_s']}s); "
            f"bare engine {e['steps']} steps of {e['mean_rows']} rows, {e['step_time_ms_mean']} ms each (busy "
            f"{e['engine_busy_s']}s = {e['engine_busy_share_of_wall'] * 100:.0f}% of {eng['wall_s']}s)")
        notes.append(f"a step inside the service takes {w['step_time_ms_mean'] / e['step_time_ms_mean']:.2f}x the "
                     "bare engine's; per row "
                     f"{(w['step_time_ms_mean'] / w['mean_rows']) / (e['step_time_ms_mean'] / e['mean_rows']):.2f}x; "
                     f"the service ran {w['steps'] / e['steps']:.3f}x as many steps (requests reach the engine one "
                     "by one, not together)")
        if "engine_thread_on_cpu_share_of_busy" in w:
            share = w["engine_thread_on_cpu_share_of_busy"]
            bare = e["engine_thread_on_cpu_share_of_busy"]
            notes.append(f"the engine loop's thread was on a CPU for {share * 100:.0f}% of its step time in the worker "
                         f"vs {bare * 100:.0f}% in the bare engine (the rest: waiting for the GIL or for a core)")
    cpu = svc.get("cpu")
    if cpu:
        parts = ", ".join(f"{k} {v:.2f}s" for k, v in cpu["cpu_s"].items())
        notes.append(f"CPU while the service ran ({cpu['wall_s']}s wall, {cpu['cores']} cores): {parts}; "
                     f"{cpu['utilisation_of_all_cores'] * 100:.0f}% of all cores busy")
    with_publisher = out["modes"].get(DIAGNOSTIC, {})
    diag = with_publisher.get("engine")
    if diag and e:
        notes.append(f"the worker's publisher thread alone ({DIAGNOSTIC}, same process, no gateway/clients): "
                     f"{diag['step_time_ms_mean']} ms per step vs {e['step_time_ms_mean']} ms bare "
                     f"({diag['step_time_ms_mean'] / e['step_time_ms_mean']:.2f}x), tok/s "
                     f"{with_publisher['tok_s']} vs {eng['tok_s']} "
                     f"({with_publisher['tok_s'] / eng['tok_s']:.2f}x); its engine thread on a CPU "
                     f"{diag['engine_thread_on_cpu_share_of_busy'] * 100:.0f}% of its step time")
    pc, rc = eng.get("python_costs"), svc.get("redis_costs")
    pub = with_publisher.get("publisher")
    if pc and rc and e:
        b = pc["rows_per_step"]
        gw = b * (pc["gateway_decode_and_reencode_us"] / 1e3 + rc["gateway_xread_ms_per_call"])
        conv = b * pc["worker_convert_and_encode_us"] / 1e3
        dec = b * pc["worker_decode_draft_us"] / 1e3
        text = (f"per step of {b} rows, timed alone: detokenise + encode {conv:.2f} ms (tokenizer.decode {dec:.2f} "
                f"ms of it), gateway >= {gw:.2f} ms (an XREAD + decode + re-encode per event, before WebSocket "
                f"framing), clients "
                f"{b * pc['client_json_loads_us'] / 1e3:.2f} ms (json.loads)")
        if pub:
            text += (f"; the publisher thread beside the engine: convert {pub['convert_ms_mean']} ms + Redis script "
                     f"{pub['write_ms_mean']} ms per step")
        notes.append(text + f"; the bare engine step: {e['step_time_ms_mean']} ms")
    return notes


def write_json(out: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")


def plot(out: dict, records: dict[str, list[Record]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"service": "#2a7", "engine": "#666", DIAGNOSTIC: "#d93"}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))

    def cdf(ax, key: str, title: str) -> None:
        for mode, recs in records.items():
            ok = [r for r in recs if r.error is None]
            v = sorted(g for r in ok for g in r.step_gaps_s) if key == "step_interval_s" else sorted(
                getattr(r, key) for r in ok if getattr(r, key) is not None)
            if v:
                ax.step([x * 1e3 for x in v], [(i + 1) / len(v) for i in range(len(v))], where="post",
                        color=colors.get(mode), label=f"{mode} (p50 {pct(v, 0.5) * 1e3:.0f} ms)")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of step gaps" if key == "step_interval_s" else "fraction of requests")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    cdf(axes[0], "first_step_s", "time to first step event")
    cdf(axes[1], "step_interval_s", "interval between step events")
    cdf(axes[2], "e2e_s", "end-to-end latency")
    modes = list(out["modes"])
    axes[3].bar(modes, [out["modes"][m]["tok_s"] for m in modes], color=[colors.get(m) for m in modes])
    for i, m in enumerate(modes):
        runs = [x["tok_s"] for x in out["modes"][m]["runs"]]
        axes[3].scatter([i] * len(runs), runs, color="k", s=12, zorder=3)
    axes[3].set_ylabel("output tokens / s (dots: single runs)")
    r = out.get("ratios", {}).get("tok_s_service_over_engine")
    axes[3].set_title(f"throughput: service / engine = {r}" if r is not None else "throughput", fontsize=10)
    s = out["settings"]
    fig.suptitle(f"dgserve, full service (every step streamed over WebSocket) vs in-process engine: {s['clients']} "
                 f"clients x {s['requests_per_client']} requests x {s['repeats']} runs, {s['prompt_tokens']}-token "
                 f"prompts, {s['max_new_tokens']} new tokens, {s['steps']} steps/canvas, max_batch {s['max_batch']}"
                 f"\n{out['checkpoint_kind']}; {out['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}", flush=True)


def _fmt(d: dict) -> str:
    if not d.get("n"):
        return f"{'-':>8s} {'-':>8s} {'-':>8s}"
    return f"{d['p50'] * 1e3:8.1f} {d['p90'] * 1e3:8.1f} {d['p99'] * 1e3:8.1f}"


def print_summary(s: dict) -> None:
    se = s["step_events"]
    print(f"\n[{s['name']}] {s['completed']}/{s['requests']} ok, errors {s['errors'] or 'none'}, "
          f"{s['completion_tokens']} tokens in {s['wall_s']:.2f}s = {s['tok_s']:.1f} tok/s (runs: "
          f"{', '.join(str(r['tok_s']) for r in s['runs'])}); step events {se['received']}/{se['expected']} "
          f"(missing {se['missing']})", flush=True)
    print(f"  {'ms':16s} {'p50':>8s} {'p90':>8s} {'p99':>8s}", flush=True)
    for key in METRICS:
        print(f"  {key:16s} {_fmt(s[key])}", flush=True)


def print_final(out: dict) -> None:
    r = out.get("ratios")
    if r:
        print(f"\nservice/engine tok/s = {r['tok_s_service_over_engine']} "
              f"(per run {r['tok_s_service_over_engine_per_run']}; goal >= {r['goal']}); "
              f"p50 e2e engine/service = {r['e2e_p50_engine_over_service']}; "
              f"p50 first step engine/service = {r['first_step_p50_engine_over_service']}", flush=True)
    st = out["same_tokens"]
    print(f"same tokens for the same requests ({st['runs']} runs vs {st['reference']}): "
          f"{st['identical']}/{st['compared']}{'' if st['all_identical'] else ' MISMATCH: ' + str(st['mismatched'])}",
          flush=True)
    for line in out.get("analysis", []):
        print(f"  - {line}", flush=True)
