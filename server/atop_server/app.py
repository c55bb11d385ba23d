"""The server: KServe v2 + atop.v1.Classifier + health + reflection on grpc.aio, the KServe v2 REST API on the
same loop (http/), and the metrics port.

Stopping: health turns NOT_SERVING, new requests are refused, in-flight ones finish within the grace period
(then they are cancelled, whatever the streams do), the batchers finish what they run. cli.py is the command.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from atop_proto import classify_pb2, classify_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from atop_server.auth import AuthConfig, TokenAuthInterceptor
from atop_server.classify_service import ClassifierService
from atop_server.core import CoreConfig, InferenceCore
from atop_server.http import HttpConfig, HttpServer
from atop_server.kserve import KServeService
from atop_server.metrics import Metrics
from atop_server.servicing import ServingInterceptor

log = logging.getLogger("atop_server")
SERVICES = (
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    classify_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
)
T = TypeVar("T")


@dataclass(frozen=True)
class TlsConfig:
    """PEM bytes. root_cert verifies client certificates (mutual TLS: clients must present one it signed)."""

    server_cert: bytes
    server_key: bytes
    root_cert: bytes | None = None
    mutual: bool = False


@dataclass(frozen=True)
class ServerConfig:
    core: CoreConfig
    host: str = "127.0.0.1"
    port: int = 8001  # gRPC; 0 picks a free port (logged)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8002  # Prometheus /metrics over HTTP; 0 picks a free port, -1 disables
    health_port: int = -1  # grpc.health.v1 alone, plaintext, on host (for probes when port has TLS); -1: none
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC's default 4 MiB is ~4000 CIFAR JPEGs, too few for big images
    # HTTP/2 concurrent streams one connection may open. gRPC clients multiplex every call over one connection:
    # at 128, an open-loop client at twice capacity had a third of its calls reset by the transport (UNAVAILABLE,
    # REFUSED_STREAM) instead of refused by admission control (RESOURCE_EXHAUSTED, which says: retry later).
    max_streams_per_connection: int = 1024
    grace_seconds: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    health_services: tuple[str, ...] = field(default=SERVICES)
    tls: TlsConfig | None = None
    auth: AuthConfig = field(default_factory=AuthConfig)
    http: HttpConfig | None = None  # the REST API on host (same TLS, tokens, limits); None: gRPC only
    log_level: str = "INFO"  # of the process's logging, which atop-serve's main sets up (the Server does not)


class StartupError(Exception):
    """The server cannot start (a busy port, say); the message says what to change."""


def port_is_free(host: str, port: int) -> bool:
    """Whether a listener could bind there: asked before grpc, which would log its own multi-line error."""
    for family, kind, protocol, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no owner
            try:
                probe.bind(address)
            except OSError:
                return False
    return True


def _listen(
    server: grpc.aio.Server, what: str, host: str, port: int, credentials: grpc.ServerCredentials | None, flags: str
) -> int:
    """Bind a port (0: a free one), or fail with one line naming it and the flags that set it."""
    address = f"{host}:{port}"
    if port and not port_is_free(host, port):
        raise StartupError(f"cannot bind {what} to {address}: the port is in use ({flags})")
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        bound = 0  # grpc.aio raises where grpc returns 0
    if not bound:
        raise StartupError(f"cannot bind {what} to {address}: the address is not allowed ({flags})")
    return bound


class Server:
    """A started server: ports bound, models loaded and warmed up, health SERVING. gRPC runs on an asyncio
    loop in its own thread, so that start() and stop() can be called from plain code (main, tests)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.core = InferenceCore(config.core, self.metrics.record_execution)
        self.metrics.decoded_images.set_function(lambda: self.core.decoded_images)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-loop", daemon=True)
        self._thread.start()
        try:
            self.port = self._on_loop(self._bind())
            self.http_port = self._on_loop(self._bind_http())
            self.metrics_port = self._serve_metrics()
        except BaseException:
            self._close_loop()
            raise
        self.stopped = threading.Event()

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _bind(self) -> int:
        config = self.config
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_concurrent_streams", config.max_streams_per_connection),
            ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share its traffic
        ]
        # Token checks first: a refused call never reaches the service nor its metrics.
        interceptors: list[grpc.aio.ServerInterceptor] = (
            [TokenAuthInterceptor(config.auth)] if config.auth.tokens else []
        )
        interceptors.append(ServingInterceptor(self.metrics, SERVICES))
        self.grpc = grpc.aio.server(options=options, interceptors=interceptors)
        self.kserve = KServeService(self.core, self.metrics, config.core.max_images_per_request)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.kserve, self.grpc)
        classify_pb2_grpc.add_ClassifierServicer_to_server(ClassifierService(self.core, self.metrics), self.grpc)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        credentials = None
        if config.tls is not None:
            credentials = grpc.ssl_server_credentials(
                [(config.tls.server_key, config.tls.server_cert)],
                root_certificates=config.tls.root_cert,
                require_client_auth=config.tls.mutual,
            )
        port = _listen(self.grpc, "gRPC", config.host, config.port, credentials, "--port, ATOP_PORT")
        # Kubernetes' gRPC probes speak neither TLS nor tokens: health alone, plaintext, on a port of its own.
        self.health_grpc: grpc.aio.Server | None = None
        self.health_port = -1
        if config.health_port >= 0:
            self.health_grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_grpc)
            flags = "--health-port, ATOP_HEALTH_PORT"
            self.health_port = _listen(self.health_grpc, "health", config.host, config.health_port, None, flags)
        return port

    async def _bind_http(self) -> int:
        """The REST port (-1 without one); it answers at once, ready only once the models are (as gRPC)."""
        config = self.config
        self.http: HttpServer | None = None
        if config.http is None:
            return -1
        self.http = HttpServer(
            config.http, self.kserve, self.metrics, config.max_message_bytes, config.auth, config.tls
        )
        try:
            return await self.http.start(config.host, config.grace_seconds)
        except OSError as error:
            raise StartupError(
                f"cannot bind HTTP to {config.host}:{config.http.port}: {error.strerror} "
                "(--http-port, ATOP_HTTP_PORT; -1 turns HTTP off)"
            ) from None

    def _serve_metrics(self) -> int:
        if self.config.metrics_port < 0:
            return -1
        try:
            return self.metrics.serve(self.config.metrics_host, self.config.metrics_port, self.config.auth)
        except OSError as error:
            raise StartupError(
                f"cannot bind metrics to {self.config.metrics_host}:{self.config.metrics_port}: {error.strerror} "
                "(--metrics-port, ATOP_METRICS_PORT; -1 turns metrics off)"
            ) from None

    async def _set_health(self, status: int) -> None:
        for service in ("", *self.config.health_services):
            await self.health.set(service, status)

    def start(self) -> None:
        self._on_loop(self.grpc.start())  # live at once (ServerLive), ready only after the models are warmed up
        if self.health_grpc is not None:
            self._on_loop(self.health_grpc.start())
        self.core.start()
        self.metrics.served.update(self.core.models)
        for name, model in self.core.models.items():
            self.metrics.watch_queue(name, model.batcher)
        providers = {name: model.loaded.session.get_providers()[0] for name, model in self.core.models.items()}
        self._on_loop(self._set_health(health_pb2.HealthCheckResponse.SERVING))
        self.metrics.ready.set(1)
        log.info(
            json.dumps(
                {
                    "event": "serving",
                    "grpc": f"{self.config.host}:{self.port}",
                    "grpc_port": self.port,
                    "http_port": self.http_port,
                    "metrics_port": self.metrics_port,
                    "health_port": self.health_port,
                    "tls": None if self.config.tls is None else ("mutual" if self.config.tls.mutual else "server"),
                    "auth": "bearer tokens" if self.config.auth.tokens else None,
                    # where to look, for a person reading the first log line of `make serve`
                    "http": f"{'https' if self.config.tls else 'http'}://{self.config.host}:{self.http_port}/"
                    if self.http_port >= 0
                    else None,
                    "metrics": f"http://{self.config.metrics_host}:{self.metrics_port}/metrics"
                    if self.metrics_port >= 0
                    else None,
                    "health": f"grpc.health.v1 on {self.config.host}:{self.port}, services: '', "
                    + ", ".join(self.config.health_services),
                    "models": list(self.core.models),
                    "providers": providers,
                }
            )
        )

    async def _stop_grpc(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        # After the grace period grpc cancels every RPC still running, streams included: shutdown is bounded.
        # HTTP drains alongside, within the same grace period.
        await asyncio.gather(self.grpc.stop(self.config.grace_seconds), *([self.http.stop()] if self.http else []))
        if self.health_grpc is not None:
            await self.health_grpc.stop(0)

    def close(self) -> float:
        """Stop serving (gracefully, within the grace period) and the workers; returns how long the RPCs took
        to drain. Quiet: for a server that failed to start, too."""
        started = time.monotonic()
        self.metrics.ready.set(0)
        self._on_loop(self._stop_grpc())
        rpcs_done = time.monotonic() - started
        self.core.close()
        self._close_loop()
        self.stopped.set()
        return rpcs_done

    def stop(self) -> None:
        """Graceful: NOT_SERVING, refuse new RPCs, let in-flight ones finish, then stop the workers; logged."""
        started = time.monotonic()
        log.info(json.dumps({"event": "stopping", "grace_seconds": self.config.grace_seconds}))
        rpcs_done = self.close()
        log.info(
            json.dumps(
                {
                    "event": "stopped",
                    "rpcs_drained_seconds": round(rpcs_done, 3),
                    "total_seconds": round(time.monotonic() - started, 3),
                }
            )
        )
