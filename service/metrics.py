"""Gateway metrics (Prometheus), named after vLLM's with our prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

P = "dgserve:"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.http = Counter(P + "http_requests", "HTTP requests by route and status", ["route", "status"],
                            registry=r)
        self.accepted = Counter(P + "requests_accepted", "Requests queued", ["model_name"], registry=r)
        self.rejected = Counter(P + "requests_rejected", "Requests refused before queueing", ["reason"],
                                registry=r)
        self.finished = Counter(P + "gateway_request_finished", "Requests that reached a final event",
                                ["model_name", "outcome"], registry=r)
        self.first_step = Histogram(P + "gateway_time_to_first_step_seconds",
                                    "From accept to the first step event seen by the gateway", ["model_name"],
                                    registry=r, buckets=BUCKETS)
        self.e2e = Histogram(P + "gateway_e2e_request_latency_seconds", "From accept to the final event",
                             ["model_name"], registry=r, buckets=BUCKETS)
        self.queue_depth = Gauge(P + "redis_queue_depth", "Requests queued in Redis, not yet taken by a worker",
                                 ["model_name"], registry=r)
        self.stream_pending = Gauge(P + "redis_stream_pending", "Requests taken by a worker and not yet finished",
                                    ["model_name"], registry=r)
        self.workers = Gauge(P + "workers_alive", "Workers with a fresh heartbeat", ["model_name"], registry=r)
        self.redis_up = Gauge(P + "redis_up", "Whether the gateway reaches Redis", registry=r)
        self.websockets = Gauge(P + "websocket_connections", "Open WebSocket connections", registry=r)
