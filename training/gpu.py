"""Train both checkpoints within one wall-clock budget: the scripted GPU run (`python -m training gpu`).

By default the two trainings run side by side, as two processes on the one GPU, each with (almost) the whole
budget: a step of these small models is bound by kernel launches on the CPU side more than by the GPU, so two
processes keep the GPU busier than one. `--sequential` splits the budget instead.

This process imports no torch (it starts in well under a second); it launches `python -m training sudoku|text`,
prefixes and tees their output (`<out>/<name>/train.log`), kills a child that overruns the budget by more than
`GRACE_S` (its best checkpoint is already on disk), and prints a summary table. No network is needed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

MARGIN_S = 6.0  # process start + interpreter exit, on top of each child's --max-seconds
GRACE_S = 45.0  # a child still running this long after the budget is killed
RETRY_MIN_S = 45.0  # a failed child is retried in --safe mode only if at least this much time is left


def gpu_info() -> tuple[str, float]:
    """(name, memory GiB) of GPU 0 from nvidia-smi, without importing torch; ("unknown", 0) if unavailable."""
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            if out:
                name, mem = (x.strip() for x in out[0].split(",", 1))
                return name, float(mem) / 1024
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
    return "unknown", 0.0


def _pump(stream, prefix: str, log_file: Path) -> None:
    with open(log_file, "a", buffering=1) as f:
        for line in iter(stream.readline, ""):
            f.write(line)
            sys.stdout.write(f"{prefix} {line}")
            sys.stdout.flush()


SMALL_GPU_BATCH = {"sudoku": "1024", "text": "256"}  # under 100 GiB; a big card takes the trainer's defaults


def _command(name: str, out_dir: Path, seconds: float, args, big_gpu: bool) -> list[str]:
    cmd = [sys.executable, "-m", "training", name, "--out", str(out_dir), "--max-seconds", f"{seconds:.0f}",
           "--device", args.device]
    if args.smoke:
        cmd.append("--smoke")
    elif args.device != "cpu" and not big_gpu:
        cmd += ["--batch-size", SMALL_GPU_BATCH[name]]
    if args.init_from:
        cmd += ["--init", str(Path(args.init_from) / name)]
    if name == "text":
        cmd += (["--corpus", args.corpus] if args.corpus else []) + \
            (["--canvas-length", str(args.text_canvas)] if args.text_canvas else [])
    cmd += shlex.split(args.extra) + shlex.split(getattr(args, f"{name}_args") or "")
    return cmd


def _launch(name: str, cmd: list[str], out_dir: Path, threads: int, append: bool = False):
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = out_dir / "train.log"
    with open(log_file, "a" if append else "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads),
               PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
               TOKENIZERS_PARALLELISM="true", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=Path(__file__).resolve().parent.parent)
    pump = threading.Thread(target=_pump, args=(proc.stdout, f"[{name}]", log_file), daemon=True)
    pump.start()
    return proc, pump


def _wait(procs: dict, deadline: float, retry=None) -> dict[str, int]:
    """Wait for every child; kill one that overruns the deadline by GRACE_S. `retry(name, rc)` may return a new
    (proc, pump) for a child that failed, which is then waited for instead (once per child)."""
    codes: dict[str, int] = {}
    retried: set[str] = set()
    while len(codes) < len(procs):
        for name, (proc, pump) in list(procs.items()):
            if name in codes:
                continue
            rc = proc.poll()
            if rc is None and time.time() > deadline + GRACE_S:
                print(f"[gpu] {name} overran the budget by {GRACE_S:.0f}s: killing it (its best checkpoint stays)",
                      flush=True)
                proc.kill()
                rc = proc.wait()
            if rc is None:
                continue
            pump.join(timeout=5)
            again = retry(name, rc) if retry is not None and rc != 0 and name not in retried else None
            if again is not None:
                retried.add(name)
                procs[name] = again
                continue
            codes[name] = rc
        time.sleep(0.5)
    return codes


def summarize(out: Path, names: list[str], codes: dict[str, int], gpu: str, wall: float) -> tuple[str, list]:
    rows = []
    for name in names:
        meta_path = out / name / "dgserve.json"
        row: dict = {"model": name, "rc": codes.get(name)}
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            ev = meta.get("eval") or {}
            run = meta.get("run") or {}
            hist = meta.get("history") or []
            if name == "sudoku":
                metric = (f"solve {ev.get('solve_rate', float('nan')):.3f} "
                          f"cell {ev.get('one_shot_cell_acc', float('nan')):.3f}")
            else:
                metric = f"val_loss {ev.get('val_loss', float('nan')):.3f}"
            weights = out / name / "model.safetensors"
            size = weights.stat().st_size if weights.exists() else 0
            row.update(steps=run.get("steps", meta.get("steps")), saved_step=meta.get("eval_step"),
                       loss=run.get("last_loss", meta.get("loss")), metric=metric,
                       train_s=run.get("train_seconds", meta.get("train_seconds")),
                       wall_s=run.get("wall_seconds", meta.get("wall_seconds")),
                       steps_per_s=hist[-1]["steps_per_s"] if hist else None,
                       mb=round(size / 1e6, 2), device=meta.get("device"),
                       corpus=(meta.get("data") or {}).get("corpus"))
        rows.append(row)
    header = f"{'model':8} {'rc':>3} {'steps':>7} {'saved@':>7} {'loss':>8} {'it/s':>6} {'train s':>8} " \
             f"{'wall s':>7} {'MB':>6}  eval"
    lines = [f"GPU: {gpu}   total wall: {wall:.0f}s", header, "-" * len(header)]
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if isinstance(v, (int, float)) else format("-", ">" + fmt.lstrip("<>").rstrip("fd"))
        lines.append(f"{r['model']:8} {f(r['rc'], '>3d')} {f(r.get('steps'), '>7d')} {f(r.get('saved_step'), '>7d')} "
                     f"{f(r.get('loss'), '>8.4f')} {f(r.get('steps_per_s'), '>6.1f')} {f(r.get('train_s'), '>8.1f')} "
                     f"{f(r.get('wall_s'), '>7.1f')} {f(r.get('mb'), '>6.2f')}  {r.get('metric', 'no checkpoint')}")
    for r in rows:
        if r.get("corpus") and "mini_corpus" in str(r["corpus"]):
            lines.append("WARNING: the text model trained on the bundled excerpt (no full corpus was found: run "
                         "`python -m training corpus` where bible-kjv and fortunes are installed, and pass --corpus)")
    return "\n".join(lines), rows


def pack(out: Path, names: list[str], dest: Path, summary_text: str, rows: list) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        src = out / name
        if not (src / "model.safetensors").exists():
            continue
        target = dest / f"{name}.tar.gz"
        with tarfile.open(target, "w:gz", compresslevel=6) as tar:
            tar.add(src, arcname=name)
        print(f"[gpu] packed {target} ({target.stat().st_size / 1e6:.1f} MB)", flush=True)
    (dest / "summary.txt").write_text(summary_text + "\n")
    (dest / "summary.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")


def run_both(args, started: float) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [args.only] if args.only else ["sudoku", "text"]
    gpu, mem = gpu_info()
    big = mem >= 100
    cpus = os.cpu_count() or 2
    print(f"[gpu] {gpu} ({mem:.0f} GiB), {cpus} CPUs, budget {args.budget:.0f}s, "
          f"{'sequential' if args.sequential or len(names) == 1 else 'side by side'}: {', '.join(names)}", flush=True)
    deadline = started + args.budget
    codes: dict[str, int] = {}
    threads = max(1, cpus - 1) if args.sequential or len(names) == 1 else max(1, cpus // len(names) - 1)

    phase_end = [deadline]

    def retry(name: str, rc: int):
        """A child that failed before writing any checkpoint gets one more go in --safe mode (transformers' own
        code paths only), if enough time is left."""
        left = phase_end[0] - time.time() - MARGIN_S
        meta = out / name / "dgserve.json"
        if left < RETRY_MIN_S or (meta.exists() and meta.stat().st_mtime >= started):
            return None
        print(f"[gpu] {name} failed (exit {rc}); retrying once with --safe for {left:.0f}s", flush=True)
        cmd = _command(name, out / name, left, args, big) + ["--safe", "--batch-size", "256"]
        return _launch(name, cmd, out / name, threads, append=True)

    if args.sequential or len(names) == 1:
        for i, name in enumerate(names):
            share = (deadline - time.time()) / (len(names) - i)
            phase_end[0] = time.time() + share
            cmd = _command(name, out / name, share - MARGIN_S, args, big)
            procs = {name: _launch(name, cmd, out / name, threads)}
            codes.update(_wait(procs, time.time() + share, retry))
    else:
        seconds = deadline - time.time() - MARGIN_S
        procs = {name: _launch(name, _command(name, out / name, seconds, args, big), out / name, threads)
                 for name in names}
        codes = _wait(procs, deadline, retry)
    wall = time.time() - started
    text, rows = summarize(out, names, codes, gpu, wall)
    print(text, flush=True)
    (out / "summary.txt").write_text(text + "\n")
    if args.pack:
        pack(out, names, Path(args.pack), text, rows)
    return 0 if all(rc == 0 for rc in codes.values()) else 1
