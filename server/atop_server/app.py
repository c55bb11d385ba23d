"""atop-serve: the gRPC server (KServe v2 + atop.v1.Classifier + health + reflection) and its metrics port.

Every option is also an environment variable (ATOP_<OPTION>, e.g. ATOP_PORT=8001), for containers.
SIGTERM (and SIGINT): health turns NOT_SERVING, new requests are refused, in-flight ones finish within the
grace period, then the process exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import onnxruntime as ort
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from atop_proto import classify_pb2, classify_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from atop_server.batcher import BatcherConfig
from atop_server.classify_service import ClassifierService
from atop_server.core import CoreConfig, InferenceCore
from atop_server.kserve import KServeService
from atop_server.metrics import Metrics

log = logging.getLogger("atop_server")
DEFAULT_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
SERVICES = (
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    classify_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
)


@dataclass(frozen=True)
class ServerConfig:
    core: CoreConfig
    host: str = "127.0.0.1"
    port: int = 8001  # gRPC; 0 picks a free port (logged)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8002  # Prometheus /metrics over HTTP; 0 picks a free port, -1 disables
    grpc_workers: int = 64  # concurrent RPCs being handled (each mostly waits on the batcher)
    max_message_bytes: int = 64 * 1024 * 1024  # gRPC's default 4 MiB is ~4000 CIFAR JPEGs, too few for big images
    grace_seconds: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    health_services: tuple[str, ...] = field(default=SERVICES)


class Server:
    """A started server: ports bound, models loaded and warmed up, health SERVING."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.core = InferenceCore(config.core, self.metrics.record_execution)
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
        self.grpc = grpc.server(ThreadPoolExecutor(config.grpc_workers, thread_name_prefix="grpc"), options=options)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeService(self.core, self.metrics, config.core.max_images_per_request), self.grpc
        )
        classify_pb2_grpc.add_ClassifierServicer_to_server(ClassifierService(self.core, self.metrics), self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.grpc.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {config.host}:{config.port}")
        self.metrics_port = (
            self.metrics.serve(config.metrics_host, config.metrics_port) if config.metrics_port >= 0 else -1
        )
        self.stopped = threading.Event()

    def _set_health(self, status: int) -> None:
        for service in ("", *self.config.health_services):
            self.health.set(service, status)

    def start(self) -> None:
        self.grpc.start()  # live at once (ServerLive), ready only after the models are loaded and warmed up
        self.core.start()
        self.metrics.served.update(self.core.models)
        providers = {name: model.loaded.session.get_providers()[0] for name, model in self.core.models.items()}
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.metrics.ready.set(1)
        log.info(
            json.dumps(
                {
                    "event": "serving",
                    "grpc": f"{self.config.host}:{self.port}",
                    "grpc_port": self.port,
                    "metrics_port": self.metrics_port,
                    # where to look, for a person reading the first log line of `make serve`
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

    def stop(self) -> None:
        """Graceful: NOT_SERVING, refuse new RPCs, let in-flight ones finish, then stop the workers."""
        started = time.monotonic()
        log.info(json.dumps({"event": "stopping", "grace_seconds": self.config.grace_seconds}))
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics.ready.set(0)
        self.grpc.stop(self.config.grace_seconds).wait()
        rpcs_done = time.monotonic() - started
        self.core.close()
        self.stopped.set()
        log.info(
            json.dumps(
                {
                    "event": "stopped",
                    "rpcs_drained_seconds": round(rpcs_done, 3),
                    "total_seconds": round(time.monotonic() - started, 3),
                }
            )
        )


def choose_providers(device: str) -> tuple[str, ...]:
    """auto: CUDA first when this onnxruntime build has it (it falls back to the CPU if CUDA fails to load;
    the 'serving' log line says which provider each model really got)."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ("CPUExecutionProvider",)
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise SystemExit(f"--device cuda: this onnxruntime build has no CUDA provider ({available})")
    if "CUDAExecutionProvider" in available:
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


def _env(name: str, default: object) -> str:
    return os.environ.get(f"ATOP_{name.upper()}", str(default))


def parse_args(argv: list[str] | None) -> ServerConfig:
    parser = argparse.ArgumentParser(
        prog="atop-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    batcher, core_defaults = BatcherConfig(), CoreConfig(Path())
    options = [
        ("model_repository", Path, DEFAULT_REPOSITORY, "model repository (Triton layout) written by atop-export"),
        ("models", str, "", "comma-separated models to serve (default: all in the repository)"),
        ("default_model", str, "", "model for atop.v1.Classifier requests that name none"),
        ("host", str, "127.0.0.1", "gRPC address to bind (0.0.0.0 in containers)"),
        ("port", int, 8001, "gRPC port (0: a free one, logged)"),
        ("metrics_host", str, "127.0.0.1", "Prometheus metrics address"),
        ("metrics_port", int, 8002, "Prometheus metrics port (0: a free one; -1: off)"),
        ("device", str, "auto", "auto (CUDA when it loads, else CPU), cuda or cpu"),
        ("intra_op_threads", int, 0, "onnxruntime threads per model (0: one per core)"),
        ("decode_workers", int, core_defaults.decode_workers, "threads decoding images"),
        ("max_batch_size", int, batcher.max_batch_size, "images per model execution"),
        ("max_queue_delay_us", int, batcher.max_queue_delay_us, "extra wait for a batch that has company"),
        ("max_queue_size", int, batcher.max_queue_size, "images waiting before RESOURCE_EXHAUSTED"),
        ("max_draws", int, core_defaults.max_draws, "upper bound of the draws request parameter"),
        ("max_images_per_request", int, core_defaults.max_images_per_request, "images in one request"),
        ("max_message_mb", int, 64, "largest gRPC message, MiB"),
        ("grace_seconds", float, 30.0, "SIGTERM: time in-flight requests get to finish"),
        ("log_level", str, "INFO", "DEBUG, INFO, WARNING"),
    ]
    for name, kind, default, text in options:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            default=kind(_env(name, default)),
            help=f"{text} [env ATOP_{name.upper()}; default {default}]",
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(message)s")
    core = CoreConfig(
        model_repository=args.model_repository,
        models=tuple(m for m in args.models.split(",") if m),
        default_model=args.default_model,
        providers=choose_providers(args.device),
        intra_op_threads=args.intra_op_threads,
        decode_workers=args.decode_workers,
        max_draws=args.max_draws,
        max_images_per_request=args.max_images_per_request,
        batcher=BatcherConfig(args.max_batch_size, args.max_queue_delay_us, args.max_queue_size),
    )
    return ServerConfig(
        core=core,
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        grace_seconds=args.grace_seconds,
    )


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    server = Server(config)
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    stopping.wait()
    server.stop()


if __name__ == "__main__":
    main()
