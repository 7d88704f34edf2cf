"""`dgserve`: one command for every process and tool of the project.

    dgserve up            everything on this machine: Redis, the gateway, a CPU worker per model
    dgserve gateway       the HTTP/WebSocket gateway (no torch)
    dgserve worker        a worker: loads a model, serves it from Redis
    dgserve generate      stream one generation to the terminal, the draft converging in place
    dgserve sudoku        solve a Sudoku, the grid converging in the terminal
    dgserve train         train the small embedded checkpoints
    dgserve build-random  build a small untrained checkpoint (tests)

Settings come from the environment (DG_*, REDIS_URL); flags override them.
"""

from __future__ import annotations

import argparse
import os
import sys


def _gateway(args: argparse.Namespace) -> int:
    from service.server import run_gateway
    from service.settings import GatewaySettings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    if args.models:
        overrides["models"] = args.models
    return run_gateway(GatewaySettings(**overrides))


def _worker(args: argparse.Namespace) -> int:
    from worker.main import run_worker
    from worker.settings import WorkerSettings

    overrides = {
        "model_name": args.model_name, "model_path": args.model_path, "device": args.device,
        "max_batch": args.max_batch, "max_context": args.max_context, "metrics_port": args.metrics_port,
    }
    return run_worker(WorkerSettings(**{k: v for k, v in overrides.items() if v is not None}))


def _up(args: argparse.Namespace) -> int:
    from dgserve.embedded import run_embedded

    return run_embedded(host=args.host, port=args.port, models=args.models, workers_per_model=args.workers)


def _build_random(args: argparse.Namespace) -> int:
    from worker.checkpoints import build_random_checkpoint

    path = build_random_checkpoint(args.out, seed=args.seed, canvas_length=args.canvas_length)
    print(f"built {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from training import main as train_main

    return train_main(args.rest)


def _generate(args: argparse.Namespace) -> int:
    from dgserve.terminal import generate_command

    return generate_command(args)


def _sudoku(args: argparse.Namespace) -> int:
    from dgserve.terminal import sudoku_command

    return sudoku_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="Redis + gateway + CPU workers on this machine (Ctrl-C stops all)",
                        description="Starts its own Redis (unless REDIS_URL is set), the gateway, and one worker "
                                    "per model, then waits until they are ready and prints where it listens.")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--models", help="name=path,... (default: the checkpoints under models/)")
    up.add_argument("--workers", type=int, default=1, help="workers per model")
    up.set_defaults(func=_up)

    gw = sub.add_parser("gateway", help="the HTTP/WebSocket gateway (env: DG_*, REDIS_URL)")
    gw.add_argument("--host")
    gw.add_argument("--port", type=int)
    gw.add_argument("--models", help="name=path_or_hf_id,... (env DG_MODELS)")
    gw.set_defaults(func=_gateway)

    wk = sub.add_parser("worker", help="a worker serving one model (env: DG_*, REDIS_URL, HF_*)")
    wk.add_argument("--model-name")
    wk.add_argument("--model-path", help="local directory or Hugging Face id")
    wk.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    wk.add_argument("--max-batch", type=int)
    wk.add_argument("--max-context", type=int)
    wk.add_argument("--metrics-port", type=int, help="/metrics, /healthz, /readyz (0: off)")
    wk.set_defaults(func=_worker)

    gen = sub.add_parser("generate", help="stream a generation to the terminal from a running service")
    gen.add_argument("prompt")
    gen.add_argument("--url", default=os.environ.get("DG_URL", "http://127.0.0.1:8000"))
    gen.add_argument("--model")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--steps", type=int, dest="max_denoising_steps")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    gen.add_argument("--json", action="store_true", help="print the final answer as JSON only")
    gen.add_argument("--api-key", default=os.environ.get("DG_API_KEY"))
    gen.set_defaults(func=_generate)

    sd = sub.add_parser("sudoku", help="solve a Sudoku on a running service, the grid converging live")
    sd.add_argument("puzzle", nargs="?", help="81 characters, 0 or . for blanks (default: a bundled example)")
    sd.add_argument("--url", default=os.environ.get("DG_URL", "http://127.0.0.1:8000"))
    sd.add_argument("--seed", type=int)
    sd.add_argument("--json", action="store_true")
    sd.add_argument("--api-key", default=os.environ.get("DG_API_KEY"))
    sd.set_defaults(func=_sudoku)

    tr = sub.add_parser("train", help="train the embedded checkpoints (see `dgserve train --help`)",
                        add_help=False)
    tr.add_argument("rest", nargs=argparse.REMAINDER)
    tr.set_defaults(func=_train)

    br = sub.add_parser("build-random", help="build a small untrained checkpoint")
    br.add_argument("out")
    br.add_argument("--seed", type=int, default=0)
    br.add_argument("--canvas-length", type=int, default=32)
    br.set_defaults(func=_build_random)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
