"""atop-serve's configuration from ATOP_* environment variables (how containers configure it): every option
but the TLS and token files (tests/server/test_security.py) is read from its variable into the very field it
sets, and a flag given on the command line wins over its variable."""

from pathlib import Path

from atop_server.app import ServerConfig
from atop_server.auth import AuthConfig
from atop_server.batcher import BatcherConfig
from atop_server.cli import OPTIONS, parse_args
from atop_server.core import CoreConfig
from atop_server.http import HttpConfig

FILE_OPTIONS = {"grpc_server_cert", "grpc_server_key", "grpc_root_cert", "auth_token_file"}


def environment(repository: Path) -> dict[str, str]:
    """A value for every option, each unlike its default, so that a variable read into the wrong field shows."""
    return {
        "ATOP_MODEL_REPOSITORY": str(repository),
        "ATOP_MODELS": "echo,slow",
        "ATOP_DEFAULT_MODEL": "slow",
        "ATOP_HOST": "0.0.0.0",
        "ATOP_PORT": "9101",
        "ATOP_METRICS_HOST": "0.0.0.0",
        "ATOP_METRICS_PORT": "9102",
        "ATOP_HEALTH_PORT": "9103",
        "ATOP_DEVICE": "cpu",
        "ATOP_INTRA_OP_THREADS": "3",
        "ATOP_DECODE_WORKERS": "5",
        "ATOP_MAX_BATCH_SIZE": "16",
        "ATOP_MAX_QUEUE_DELAY_US": "250",
        "ATOP_MAX_QUEUE_SIZE": "512",
        "ATOP_MAX_CLIENT_QUEUE_SIZE": "128",
        "ATOP_MAX_QUEUE_WAIT_SECONDS": "2.5",
        "ATOP_MAX_DRAWS": "8",
        "ATOP_MAX_IMAGES_PER_REQUEST": "100",
        "ATOP_MAX_REQUEST_PIXELS": "1000000",
        "ATOP_MAX_PIXELS_IN_FLIGHT": "3000000",
        "ATOP_MAX_MESSAGE_MB": "16",
        "ATOP_MAX_STREAMS_PER_CONNECTION": "32",
        "ATOP_GRACE_SECONDS": "7.5",
        "ATOP_LOG_LEVEL": "warning",
        "ATOP_GRPC_USE_SSL": "false",
        "ATOP_GRPC_USE_SSL_MUTUAL": "no",
        "ATOP_PUBLIC_REFLECTION": "true",
        "ATOP_PUBLIC_METRICS": "true",
        "ATOP_HTTP_PORT": "9104",
        "ATOP_HTTP_TIMEOUT_SECONDS": "12.5",
        "ATOP_DEMO": "false",
    }


def test_every_option_is_read_from_its_variable_into_its_field(echo_repository, monkeypatch):
    variables = environment(echo_repository)
    assert {f"ATOP_{name.upper()}" for name, *_ in OPTIONS} - set(variables) == {
        f"ATOP_{name.upper()}" for name in FILE_OPTIONS
    }
    for variable, value in variables.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.delenv("ATOP_AUTH_TOKENS", raising=False)  # read beside the options; test_security.py has it
    assert parse_args([]) == ServerConfig(
        core=CoreConfig(
            model_repository=echo_repository,
            models=("echo", "slow"),
            default_model="slow",
            providers=("CPUExecutionProvider",),
            intra_op_threads=3,
            decode_workers=5,
            max_draws=8,
            max_images_per_request=100,
            max_request_pixels=1_000_000,
            max_pixels_in_flight=3_000_000,
            batcher=BatcherConfig(
                max_batch_size=16,
                max_queue_delay_us=250,
                max_queue_size=512,
                max_client_queue_size=128,
                max_queue_wait_seconds=2.5,
            ),
        ),
        host="0.0.0.0",
        port=9101,
        metrics_host="0.0.0.0",
        metrics_port=9102,
        health_port=9103,
        max_message_bytes=16 * 1024 * 1024,
        max_streams_per_connection=32,
        grace_seconds=7.5,
        tls=None,
        auth=AuthConfig(tokens=frozenset(), public_reflection=True, public_metrics=True),
        http=HttpConfig(port=9104, timeout_seconds=12.5, demo=False),
        log_level="WARNING",
    )


def test_a_flag_wins_over_its_variable(echo_repository, monkeypatch):
    monkeypatch.setenv("ATOP_MODEL_REPOSITORY", "/nonexistent")
    monkeypatch.setenv("ATOP_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("ATOP_PORT", "9101")
    config = parse_args(["--model-repository", str(echo_repository), "--max-batch-size", "4", "--port", "0"])
    assert (config.core.model_repository, config.core.batcher.max_batch_size, config.port) == (echo_repository, 4, 0)
