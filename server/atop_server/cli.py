"""atop-serve: serve a model repository over gRPC (KServe v2 + atop.v1.Classifier) and the KServe v2 REST API
over HTTP (same core, limits, TLS and tokens), with metrics on a port of their own.

Every option is also an environment variable ATOP_<OPTION> (e.g. ATOP_PORT=8001), for containers; bearer
tokens come from --auth-token-file and/or ATOP_AUTH_TOKENS (comma-separated). Every option is checked at
start: a bad one is reported in one line naming the flag or variable (exit code 2); a startup fault (no
model, a broken model, a busy port) in one line too (exit code 1).
SIGTERM (and SIGINT): health turns NOT_SERVING, in-flight requests finish within --grace-seconds, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import onnxruntime as ort

from atop_server.app import Server, ServerConfig, StartupError, TlsConfig
from atop_server.auth import AuthConfig, read_tokens
from atop_server.batcher import BatcherConfig
from atop_server.core import CoreConfig
from atop_server.http import HttpConfig
from atop_server.repository import ModelLoadError, ModelNotFoundError

DEFAULT_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEVICES = ("auto", "cpu", "cuda")


class OneLineParser(argparse.ArgumentParser):
    """Errors as one line (argparse prints its whole usage first): the line names the flag or variable."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{value} must be {bound}")
        return value

    return convert


def number(low: float) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value >= low or value == float("inf"):  # also refuses nan
            raise argparse.ArgumentTypeError(f"{value} must be a finite number of at least {low}")
        return value

    return convert


def choice(values: tuple[str, ...], fold: Callable[[str], str] = str.lower) -> Callable[[str], str]:
    def convert(text: str) -> str:
        if fold(text) not in values:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(values)}")
        return fold(text)

    return convert


def boolean(text: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
    if text.lower() not in words:
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true or false)")
    return words[text.lower()]


def text(value: str) -> str:
    return value


def nonempty(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


PORT, MAX_GRPC_MESSAGE_MB = integer(0, 65535), 2047  # grpc's message limits are signed 32-bit byte counts
batcher, core = BatcherConfig(), CoreConfig(Path())
# (option, convert, default, help); every option is also ATOP_<OPTION>.
OPTIONS: list[tuple[str, Callable[[str], Any], object, str]] = [
    ("model_repository", Path, DEFAULT_REPOSITORY, "model repository (Triton layout) written by atop-export"),
    ("models", text, "", "comma-separated models to serve (default: all in the repository)"),
    ("default_model", text, "", "model for atop.v1.Classifier requests that name none"),
    ("host", nonempty, "127.0.0.1", "gRPC address to bind (0.0.0.0 in containers)"),
    ("port", PORT, 8001, "gRPC port (0: a free one, logged)"),
    ("http_port", integer(-1, 65535), 8000, "KServe v2 REST API port, on --host (0: a free one; -1: off)"),
    ("http_timeout_seconds", number(0.001), 30.0, "HTTP: a body must arrive, an idle connection start a request"),
    ("demo", boolean, True, "the demo page at / of the HTTP port (--no-demo: off)"),
    ("metrics_host", nonempty, "127.0.0.1", "Prometheus metrics address"),
    ("metrics_port", integer(-1, 65535), 8002, "Prometheus metrics port (0: a free one; -1: off)"),
    ("health_port", integer(-1, 65535), -1, "grpc.health.v1 alone, plaintext, for probes (-1: off; 0: a free one)"),
    ("device", choice(DEVICES), "auto", "auto (CUDA when it loads, else CPU), cuda or cpu"),
    ("intra_op_threads", integer(0), 0, "onnxruntime threads per model (0: one per core)"),
    ("decode_workers", integer(1), core.decode_workers, "threads decoding images"),
    ("max_batch_size", integer(1), batcher.max_batch_size, "images per model execution"),
    ("max_queue_delay_us", integer(0), batcher.max_queue_delay_us, "extra wait for a batch that has company"),
    ("max_queue_size", integer(1), batcher.max_queue_size, "images waiting, all clients, before RESOURCE_EXHAUSTED"),
    ("max_client_queue_size", integer(1), batcher.max_client_queue_size, "images one connection may have waiting"),
    ("max_queue_wait_seconds", number(0.001), batcher.max_queue_wait_seconds, "refuse what would wait longer"),
    ("max_draws", integer(1), core.max_draws, "upper bound of the draws request parameter"),
    ("max_images_per_request", integer(1), core.max_images_per_request, "images in one request"),
    ("max_request_pixels", integer(1), core.max_request_pixels, "decoded pixels of one request's images"),
    ("max_pixels_in_flight", integer(1), core.max_pixels_in_flight, "decoded pixels of all requests at once"),
    ("max_message_mb", integer(1, MAX_GRPC_MESSAGE_MB), 64, "largest gRPC message, MiB"),
    (
        "max_streams_per_connection",
        integer(1),
        ServerConfig.max_streams_per_connection,
        "concurrent gRPC streams one connection may open",
    ),
    ("grace_seconds", number(0), 30.0, "SIGTERM: time in-flight requests get to finish"),
    ("log_level", choice(LOG_LEVELS, str.upper), "INFO", "DEBUG, INFO, WARNING, ERROR"),
    ("grpc_use_ssl", boolean, False, "TLS (needs --grpc-server-cert and --grpc-server-key)"),
    ("grpc_server_cert", Path, "", "PEM certificate (chain) of the server"),
    ("grpc_server_key", Path, "", "PEM private key of the server"),
    ("grpc_root_cert", Path, "", "PEM CA certificates that client certificates must chain to (mutual TLS)"),
    ("grpc_use_ssl_mutual", boolean, False, "mutual TLS: clients must present a certificate (needs --grpc-root-cert)"),
    ("auth_token_file", Path, "", "file of bearer tokens, one per line ('#' comments); also ATOP_AUTH_TOKENS"),
    ("public_reflection", boolean, False, "with tokens: server reflection answers without one"),
    ("public_metrics", boolean, False, "with tokens: /metrics answers without one"),
]


def _env_default(parser: OneLineParser, name: str, convert: Callable[[str], Any], default: object) -> object:
    """The default of an option: its environment variable, checked here so that the error names it."""
    variable = f"ATOP_{name.upper()}"
    if variable not in os.environ:
        return default
    try:
        return convert(os.environ[variable])
    except (argparse.ArgumentTypeError, ValueError) as error:
        parser.error(f"{variable}={os.environ[variable]!r}: {error}")


def _read(parser: OneLineParser, path: Path, flag: str, pem: str = "") -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        parser.error(f"{flag} {path}: {error.strerror}")
    if pem and f"-----BEGIN {pem}" not in data.decode("latin-1"):
        parser.error(f"{flag} {path}: not a PEM file ({pem})")
    return data


def _tls(parser: OneLineParser, args: argparse.Namespace) -> TlsConfig | None:
    given = {
        flag: path
        for flag, path in (
            ("--grpc-server-cert", args.grpc_server_cert),
            ("--grpc-server-key", args.grpc_server_key),
            ("--grpc-root-cert", args.grpc_root_cert),
        )
        if str(path) not in ("", ".")
    }
    if not args.grpc_use_ssl:
        if args.grpc_use_ssl_mutual or given:
            parser.error(f"{', '.join(given) or '--grpc-use-ssl-mutual'} given without --grpc-use-ssl true")
        return None
    for flag in ("--grpc-server-cert", "--grpc-server-key"):
        if flag not in given:
            parser.error(f"--grpc-use-ssl needs {flag}")
    if args.grpc_use_ssl_mutual and "--grpc-root-cert" not in given:
        parser.error("--grpc-use-ssl-mutual needs --grpc-root-cert (the CA of the client certificates)")
    root = given.get("--grpc-root-cert")
    return TlsConfig(
        server_cert=_read(parser, given["--grpc-server-cert"], "--grpc-server-cert", "CERTIFICATE"),
        server_key=_read(parser, given["--grpc-server-key"], "--grpc-server-key", ""),
        root_cert=_read(parser, root, "--grpc-root-cert", "CERTIFICATE") if root else None,
        mutual=args.grpc_use_ssl_mutual,
    )


def _auth(parser: OneLineParser, args: argparse.Namespace) -> AuthConfig:
    tokens = read_tokens(os.environ.get("ATOP_AUTH_TOKENS", ""), ",")
    if str(args.auth_token_file) not in ("", "."):
        from_file = read_tokens(_read(parser, args.auth_token_file, "--auth-token-file").decode())
        if not from_file:
            parser.error(f"--auth-token-file {args.auth_token_file}: holds no token")
        tokens |= from_file
    try:
        return AuthConfig(tokens=tokens, public_reflection=args.public_reflection, public_metrics=args.public_metrics)
    except ValueError as error:
        parser.error(f"--auth-token-file / ATOP_AUTH_TOKENS: {error}")


def _providers(parser: OneLineParser, device: str) -> tuple[str, ...]:
    """auto: CUDA first when this onnxruntime build has it (it falls back to the CPU if CUDA fails to load;
    the 'serving' log line says which provider each model really got)."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ("CPUExecutionProvider",)
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        parser.error(f"--device cuda: this onnxruntime build has no CUDA provider ({', '.join(available)})")
    if "CUDAExecutionProvider" in available:
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


def parse_args(argv: list[str] | None) -> ServerConfig:
    """The server's config, from options and ATOP_* variables (no side effect: main sets up logging)."""
    parser = OneLineParser(prog="atop-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, convert, default, help_text in OPTIONS:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=convert,
            default=_env_default(parser, name, convert, default),
            **({"nargs": "?", "const": True} if convert is boolean else {}),  # Triton's `--grpc-use-ssl` alone
            help=f"{help_text} [env ATOP_{name.upper()}; default {default}]",
        )
    parser.add_argument("--no-demo", dest="demo", action="store_false", help="no demo page (as --demo false)")
    args = parser.parse_args(argv)
    if not args.model_repository.is_dir():
        parser.error(f"--model-repository {args.model_repository}: no such folder (ATOP_MODEL_REPOSITORY)")
    ports = {
        "--port": args.port,
        "--http-port": args.http_port,
        "--metrics-port": args.metrics_port,
        "--health-port": args.health_port,
    }
    chosen = [(flag, port) for flag, port in ports.items() if port > 0]
    for i, (flag, port) in enumerate(chosen):
        for other, same in chosen[i + 1 :]:
            if port == same:
                parser.error(f"{flag} and {other} are both {port}")
    return ServerConfig(
        core=CoreConfig(
            model_repository=args.model_repository,
            models=tuple(m for m in args.models.split(",") if m),
            default_model=args.default_model,
            providers=_providers(parser, args.device),
            intra_op_threads=args.intra_op_threads,
            decode_workers=args.decode_workers,
            max_draws=args.max_draws,
            max_images_per_request=args.max_images_per_request,
            max_request_pixels=args.max_request_pixels,
            max_pixels_in_flight=args.max_pixels_in_flight,
            batcher=BatcherConfig(
                args.max_batch_size,
                args.max_queue_delay_us,
                args.max_queue_size,
                args.max_client_queue_size,
                args.max_queue_wait_seconds,
            ),
        ),
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        max_streams_per_connection=args.max_streams_per_connection,
        grace_seconds=args.grace_seconds,
        tls=_tls(parser, args),
        auth=_auth(parser, args),
        http=HttpConfig(args.http_port, args.http_timeout_seconds, args.demo) if args.http_port >= 0 else None,
        log_level=args.log_level,
    )


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level, stream=sys.stderr, format="%(message)s")
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = Server(config)
    except StartupError as error:
        print(f"atop-serve: error: {error}", file=sys.stderr)
        sys.exit(1)
    try:
        server.start()
    except (ModelNotFoundError, ModelLoadError) as error:
        server.close()
        print(f"atop-serve: error: {error} (--model-repository, --models)", file=sys.stderr)
        sys.exit(1)
    # Timed, in a loop: CPython runs signal handlers only in the main thread, between bytecodes. A SIGTERM that
    # the kernel hands to one of grpc's or onnxruntime's threads does not interrupt an untimed wait, so the handler
    # would never run and the server would ignore it (seen once under load: no "stopping" after 180 s).
    while not stopping.wait(timeout=0.5):
        continue
    server.stop()


if __name__ == "__main__":
    main()
