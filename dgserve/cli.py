"""`dgserve`: one command for every process and tool of the project.

    dgserve up            everything on this machine: Redis, the gateway, a CPU worker per model
    dgserve gateway       the HTTP/WebSocket gateway (no torch)
    dgserve worker        a worker: loads a model, serves it from Redis
    dgserve generate      stream one generation to the terminal, the draft converging in place
    dgserve sudoku        solve a Sudoku, the grid converging in the terminal
    dgserve train         train the small embedded checkpoints (`dgserve train --help`)
    dgserve build-random  build a small untrained checkpoint (tests)

`dgserve COMMAND --help` describes each. Settings come from the environment (DG_*, REDIS_URL, see the README's
Configuration table); flags override them. `generate` and `sudoku` read DG_URL (the service) and DG_API_KEY.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TRAIN_PROG = "dgserve train"


def _settings(cls, command: str, overrides: dict):
    """A process's settings, or exit 2 with one line per problem naming its variable (no traceback)."""
    from pydantic import ValidationError

    from protocol.environment import describe

    try:
        return cls(**overrides)
    except ValidationError as exc:
        for line in describe(exc):
            print(f"dgserve {command}: {line}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _gateway(args: argparse.Namespace) -> int:
    from service.server import run_gateway
    from service.settings import GatewaySettings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    if args.models:
        overrides["models"] = args.models
    return run_gateway(_settings(GatewaySettings, "gateway", overrides))


def _worker(args: argparse.Namespace) -> int:
    from worker.main import run_worker
    from worker.metrics import MetricsServerError
    from worker.settings import WorkerSettings

    overrides = {
        "model_name": args.model_name, "model_path": args.model_path, "device": args.device,
        "max_batch": args.max_batch, "max_context": args.max_context, "metrics_port": args.metrics_port,
    }
    try:
        return run_worker(_settings(WorkerSettings, "worker", {k: v for k, v in overrides.items() if v is not None}))
    except MetricsServerError as exc:
        print(f"dgserve worker: {exc}", file=sys.stderr, flush=True)
        return 2


def _up(args: argparse.Namespace) -> int:
    from dgserve.embedded import run_embedded

    return run_embedded(host=args.host, port=args.port, models=args.models, workers_per_model=args.workers,
                        data_dir=args.data_dir)


def _build_random(args: argparse.Namespace) -> int:
    from training.checkpoints import build_random_checkpoint

    path = build_random_checkpoint(args.out, seed=args.seed, canvas_length=args.canvas_length)
    print(f"built {path}")
    return 0


def _train(argv: list[str]) -> int:
    from training import cli as training_cli

    return training_cli.main(argv, prog=TRAIN_PROG)


def _generate(args: argparse.Namespace) -> int:
    from dgserve.terminal import generate_command

    return generate_command(args)


def _sudoku(args: argparse.Namespace) -> int:
    from dgserve.terminal import sudoku_command

    return sudoku_command(args)


def _service_flags(p: argparse.ArgumentParser) -> None:
    """--url and --api-key of the commands that talk to a running service."""
    p.add_argument("--url", default=os.environ.get("DG_URL", "http://127.0.0.1:8000"),
                   help="the service (env DG_URL; default %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("DG_API_KEY"),
                   help="sent as a Bearer token when the service wants one (env DG_API_KEY)")


def _add_up(sub) -> None:
    from dgserve.embedded import DEFAULT_DATA_DIR

    up = sub.add_parser("up", help="Redis + gateway + CPU workers on this machine (Ctrl-C stops all)",
                        description="Starts its own Redis (unless REDIS_URL is set), the gateway, and one CPU worker "
                                    "per model, waits until every model has a worker, and prints where everything "
                                    "listens. Refuses to start when the port or the Redis data directory is taken.")
    up.add_argument("--host", default="127.0.0.1", help="address of the gateway and the workers' metrics "
                                                        "(default %(default)s: this machine only)")
    up.add_argument("--port", type=int, default=8000, help="the gateway's port (default %(default)s)")
    up.add_argument("--models", help="name=path,... (env DG_MODELS; default: the checkpoints under models/)")
    up.add_argument("--workers", type=int, default=1, help="workers per model (default %(default)s)")
    up.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                    help="Redis's data directory, one server at a time (default .cache/redis)")
    up.set_defaults(func=_up)


def _add_processes(sub) -> None:
    gw = sub.add_parser("gateway", help="the HTTP/WebSocket gateway (env: DG_*, REDIS_URL)",
                        description="The FastAPI gateway: validates requests, queues them in Redis and streams every "
                                    "denoising step back (HTTP, WebSocket, OpenAI-compatible). Never imports torch. "
                                    "Settings: DG_* and REDIS_URL (service/settings.py).")
    gw.add_argument("--host", help="address to listen on (env DG_HOST; default 127.0.0.1)")
    gw.add_argument("--port", type=int, help="port to listen on (env DG_PORT; default 8000)")
    gw.add_argument("--models", help="name=path_or_hf_id,...: tokenizers and configs served (env DG_MODELS)")
    gw.set_defaults(func=_gateway)

    wk = sub.add_parser("worker", help="a worker serving one model (env: DG_*, REDIS_URL, HF_*)",
                        description="Loads one model, takes its requests from Redis and runs them with step-level "
                                    "continuous batching, publishing every denoising step. Stops taking work and "
                                    "drains on SIGTERM. Settings: DG_*, REDIS_URL, HF_* (worker/settings.py).")
    wk.add_argument("--model-name", help="the name clients ask for (env DG_MODEL_NAME)")
    wk.add_argument("--model-path", help="local directory or Hugging Face id (env DG_MODEL_PATH)")
    wk.add_argument("--device", help="auto | cpu | cuda | cuda:N (env DG_DEVICE)")
    wk.add_argument("--max-batch", type=int, help="requests decoded together per step (env DG_MAX_BATCH)")
    wk.add_argument("--max-context", type=int, help="tokens per request the KV pool holds (env DG_MAX_CONTEXT)")
    wk.add_argument("--metrics-port", type=int,
                    help="port of /metrics, /healthz, /readyz (env DG_METRICS_PORT; 0: off)")
    wk.set_defaults(func=_worker)


def _add_clients(sub) -> None:
    gen = sub.add_parser("generate", help="stream a generation to the terminal from a running service",
                         description="Sends one request to a running service and shows its draft converging in "
                                     "place, step by step. Exit status: 0 done, 1 failed, 2 invalid, 130 Ctrl-C.")
    gen.add_argument("prompt", help="the text to continue (with --chat: the user's message)")
    _service_flags(gen)
    gen.add_argument("--model", help="a served model (default: the service's default)")
    gen.add_argument("--max-new-tokens", type=int, help="tokens to generate (default: the model's)")
    gen.add_argument("--steps", type=int, dest="max_denoising_steps", help="max denoising steps per canvas")
    gen.add_argument("--seed", type=int, help="the same seed gives the same text (default: random)")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    gen.add_argument("--json", action="store_true", help="print the final answer as JSON only")
    gen.set_defaults(func=_generate)

    sd = sub.add_parser("sudoku", help="solve a Sudoku on a running service, the grid converging live",
                        description="Solves a Sudoku with the service's `sudoku` model, redrawing the grid at every "
                                    "denoising step; the verdict is checked against the rules.")
    sd.add_argument("puzzle", nargs="?", help="81 characters, 0 or . for blanks (default: a bundled example)")
    _service_flags(sd)
    sd.add_argument("--seed", type=int, help="seed of the first attempt (default: random)")
    sd.add_argument("--json", action="store_true", help="print the final answer as JSON only")
    sd.set_defaults(func=_sudoku)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_up(sub)
    _add_processes(sub)
    _add_clients(sub)
    # listed here for `dgserve --help`; its arguments are training's own (main() hands them over)
    sub.add_parser("train", help="train the embedded checkpoints (see `dgserve train --help`)", add_help=False)

    br = sub.add_parser("build-random", help="build a small untrained checkpoint",
                        description="Builds a small DiffusionGemma checkpoint with random weights (tests, smoke runs).")
    br.add_argument("out", help="directory to write")
    br.add_argument("--seed", type=int, default=0, help="weights seed (default %(default)s)")
    br.add_argument("--canvas-length", type=int, default=32, help="canvas tokens (default %(default)s)")
    br.set_defaults(func=_build_random)
    return parser


def _run(argv: list[str]) -> int:
    if argv[:1] == ["train"]:
        return _train(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # Ctrl-C: the processes have stopped cleanly by now; no traceback
        return 130


if __name__ == "__main__":
    sys.exit(main())
