"""Prometheus metrics, modelled on Triton's (request success/failure, inference and execution counts, queue
and compute durations) plus a batch-size histogram; served over HTTP on their own port."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from atop_server.auth import DENIED, AuthConfig, TokenChecker
from atop_server.batcher import DynamicBatcher, Execution


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds the process open


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


def only_metrics(app: Callable, auth: AuthConfig) -> Callable:
    """The metrics app at /metrics and nothing else: any other path is 404, so a health probe aimed at this
    port by mistake fails instead of seeing 200. With tokens, a scrape needs one (Prometheus' `authorization`
    setting) unless the metrics are public: they tell who uses which model how much, and what fails."""
    checker = TokenChecker(auth.tokens) if auth.tokens and not auth.public_metrics else None
    plain = ("Content-Type", "text/plain; charset=utf-8")

    def routed(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [plain])
            return [b"not found: the metrics are at /metrics\n"]
        given = environ.get("HTTP_AUTHORIZATION")
        if checker is not None and not checker.accepts([] if given is None else [given]):
            start_response("401 Unauthorized", [plain, ("WWW-Authenticate", 'Bearer realm="atop-serve metrics"')])
            return [f"{DENIED}\n".encode()]
        return app(environ, start_response)

    return routed


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "atop_requests", "gRPC requests by method, model and status code", ["method", "model", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "atop_request_duration_seconds",
            "gRPC request latency",
            ["method", "model"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.inferences = Counter("atop_inference_count", "images classified (per model)", ["model"], registry=r)
        self.executions = Counter(
            "atop_inference_exec_count", "model executions (a dynamic batch counts once)", ["model"], registry=r
        )
        self.queue_seconds = Counter(
            "atop_inference_queue_duration_seconds", "time requests waited in the queue", ["model"], registry=r
        )
        self.compute_seconds = Counter(
            "atop_inference_compute_infer_duration_seconds", "model execution time", ["model"], registry=r
        )
        self.batch_size = Histogram(
            "atop_batch_size",
            "images per model execution",
            ["model"],
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
        )
        self.queued_images = Gauge("atop_queue_images", "images waiting in the batcher", ["model"], registry=r)
        self.decoded_images = Gauge("atop_decoded_images", "encoded images decoded since start", registry=r)
        self.ready = Gauge("atop_server_ready", "1 when the server reports ready", registry=r)
        self.served: set[str] = set()  # model label values; anything else a client names is "unknown"

    def model_label(self, name: str) -> str:
        """Bounded label values: a client naming random models must not grow the metrics without end."""
        return name if name in self.served else "unknown"

    def record_request(self, method: str, model: str, code: str, seconds: float) -> None:
        """One RPC, or one message of a stream: counted by status code and timed."""
        self.requests.labels(method, model, code).inc()
        self.request_seconds.labels(method, model).observe(seconds)

    def watch_queue(self, model: str, batcher: DynamicBatcher) -> None:
        """atop_queue_images{model} reads the batcher's queue at each scrape."""
        self.queued_images.labels(model).set_function(lambda: batcher.queued_images)

    def record_execution(self, model: str, execution: Execution) -> None:
        self.executions.labels(model).inc()
        if not execution.failed:
            self.inferences.labels(model).inc(execution.batch_size)
        self.queue_seconds.labels(model).inc(sum(execution.queue_seconds))
        self.compute_seconds.labels(model).inc(execution.compute_seconds)
        self.batch_size.labels(model).observe(execution.batch_size)

    def serve(self, host: str, port: int, auth: AuthConfig) -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port (0 picks a free one)."""
        app = only_metrics(make_wsgi_app(self.registry), auth)
        server = make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server.server_address[1]
