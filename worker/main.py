"""`dgserve worker`: load the model once, then serve requests from Redis until SIGTERM."""

from __future__ import annotations

import logging
import signal

from protocol.logs import setup_logging
from worker.settings import WorkerSettings

log = logging.getLogger("dgserve.worker")


def run_worker(settings: WorkerSettings) -> int:
    setup_logging(settings.log_level, settings.log_json)
    if settings.quantization == "none":
        # transformers imports torchao (when installed) with its model classes; on a CPU torchao's CUDA extensions
        # fail to load and it registers enums torch warns about: noise for a worker that quantizes nothing
        logging.getLogger("torchao").setLevel(logging.ERROR)
        logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import torch

    from worker.device import resolve_device
    from worker.engine import Engine
    from worker.loading import load_model
    from worker.metrics import WorkerMetrics, serve_http
    from worker.quantize import check_supported
    from worker.runner import Runner

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    metrics = WorkerMetrics(settings.model_name)
    state = {"loaded": False, "runner": None}

    def ready() -> tuple[bool, str]:
        if not state["loaded"]:
            return False, "model loading"
        runner = state["runner"]
        if runner is None or not runner.redis_ok:
            return False, "redis unreachable"
        if not runner.accepting.is_set():
            return False, "draining"
        return True, "ok"

    server = None
    if settings.metrics_port:
        server = serve_http(settings.metrics_host, settings.metrics_port, metrics.registry, ready)
        log.info("worker metrics and health on http://%s:%d", settings.metrics_host, server.server_port)

    try:  # a setting this machine cannot honour is a clear message, not a traceback
        check_supported(settings.quantization, resolve_device(settings.device))
    except (ValueError, RuntimeError) as exc:
        log.error("cannot start: DG_QUANTIZATION=%s: %s", settings.quantization, exc)
        if server is not None:
            server.shutdown()
        return 2
    model, tokenizer = load_model(settings.model_path, settings.device, settings.dtype, settings.quantization)
    engine = Engine(model, settings.engine_config())
    log.info("engine ready: model=%s max_batch=%d max_context=%d kv=%.1f MB/row decode=%s sampler=%s",
             settings.model_name, settings.max_batch, settings.max_context, engine.pool.bytes_per_row / 1e6,
             engine.decode_mode, engine.sampler_mode)
    metrics.engine = engine
    runner = Runner(engine, tokenizer, settings.redis_url, settings.model_name, settings.worker_id,
                    heartbeat_interval_s=settings.heartbeat_interval_s, lease_ms=settings.lease_ms,
                    max_attempts=settings.max_attempts, hooks=metrics)
    state["runner"] = runner

    def on_signal(signum, _frame):
        log.info("signal %d: draining (up to %.0fs)", signum, settings.drain_timeout_s)
        runner.drain()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runner.start()
    state["loaded"] = True
    log.info("worker %s serving model %r from %s", settings.worker_id, settings.model_name, runner.stream)
    runner.run(drain_timeout_s=settings.drain_timeout_s)
    runner.stop()
    if server is not None:
        server.shutdown()
    log.info("worker %s stopped", settings.worker_id)
    return 0
