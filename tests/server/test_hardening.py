"""atop-serve as a real process under abuse: idle streams against health, garbage on streams then SIGTERM,
busy ports, invalid options and broken models (one line, an exit code, no traceback), and errors on streams
answered per message."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serving import start_server

from atop_proto import classify_pb2, classify_pb2_grpc
from atop_proto import grpc_service_pb2 as pb
from atop_proto import grpc_service_pb2_grpc as pb_grpc

ABUSER = Path(__file__).with_name("abuse_stream.py")
CLI = [sys.executable, "-m", "atop_server.cli"]


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def infer_request(images: int = 1, **parameters: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="tiny", id="r")
    request.inputs.add(name="IMAGE", datatype="FP32", shape=[images, 3, 32, 32])
    request.raw_input_contents.append(np.zeros((images, 3, 32, 32), "<f4").tobytes())
    for name, value in parameters.items():
        request.parameters[name].string_param = value
    return request


@pytest.fixture(scope="module")
def server(tiny_repository):
    running = start_server(tiny_repository, "--models", "tiny", "--max-client-queue-size", "256")
    yield running
    assert running.stop() == 0


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60).status


def test_idle_streams_do_not_starve_health_or_other_clients(server):
    """100 open, idle ModelStreamInfer streams (more than the old 64-thread pool) from one client."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        release = threading.Event()

        def nothing():
            release.wait()
            yield from ()

        streams = [stub.ModelStreamInfer(nothing()) for _ in range(100)]
        try:
            assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING
            with grpc.insecure_channel(server.address) as other:
                answer = pb_grpc.GRPCInferenceServiceStub(other).ModelInfer(infer_request(), timeout=60)
            assert answer.outputs[0].shape == [1, 10]
        finally:
            release.set()
            assert all(list(stream) == [] for stream in streams)  # each ends cleanly once its client closes


def request_counts(server) -> Counter:
    """atop_requests_total by (method, model, code), scraped from the server's metrics port."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=60).read().decode()
    counts: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "atop_requests_total":
                counts[sample.labels["method"], sample.labels["model"], sample.labels["code"]] = sample.value
    return counts


def test_errors_on_streams_are_answered_per_message_and_the_stream_goes_on(server):
    before = request_counts(server)
    with grpc.insecure_channel(server.address) as channel:
        requests = [
            infer_request(),
            infer_request(draws="²"),  # isdigit() is True, int() fails: was UNKNOWN, ending the stream
            infer_request(images=64, draws="16"),  # 1024 inputs, more than the 256 one connection may queue
            infer_request(draws="2"),
        ]
        answers = list(pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests), timeout=120))
        assert [bool(a.error_message) for a in answers] == [False, True, True, False]
        assert answers[1].error_message == "INVALID_ARGUMENT: parameter 'draws' must be a non-negative integer, got '²'"
        assert answers[2].error_message.startswith("INVALID_ARGUMENT: 64 images x 16 draws = 1024 model inputs")
        assert answers[3].infer_response.outputs[0].shape == [1, 10]

        classify = classify_pb2_grpc.ClassifierStub(channel)
        requests = [
            classify_pb2.ClassifyRequest(model="tiny", images=[jpeg(0)], draws=999, request_id="a"),
            classify_pb2.ClassifyRequest(model="absent", images=[jpeg(0)], request_id="b"),
            classify_pb2.ClassifyRequest(model="tiny", images=[jpeg(1)], request_id="c"),
        ]
        answers = list(classify.ClassifyStream(iter(requests), timeout=120))
        assert [(a.request_id, a.code) for a in answers] == [("a", "INVALID_ARGUMENT"), ("b", "NOT_FOUND"), ("c", "")]
        assert len(answers[2].results) == 1

        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(draws="²"), timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Every message of a stream is counted by its own status, as every unary call is (one model label
    # for unknown names, so that clients cannot grow the metrics).
    counted = request_counts(server)
    counted.subtract(before)
    assert +counted == {
        ("ModelStreamInfer", "tiny", "OK"): 2,
        ("ModelStreamInfer", "tiny", "INVALID_ARGUMENT"): 2,
        ("ClassifyStream", "tiny", "INVALID_ARGUMENT"): 1,
        ("ClassifyStream", "unknown", "NOT_FOUND"): 1,
        ("ClassifyStream", "tiny", "OK"): 1,
        ("ModelInfer", "tiny", "INVALID_ARGUMENT"): 1,
    }


@pytest.mark.slow
def test_sigterm_finishes_within_the_grace_period_whatever_the_streams_did(tiny_repository):
    running = start_server(tiny_repository, "--models", "tiny", "--grace-seconds", "3")
    patterns = ["garbage", "garbage", "garbage", "idle", "unread", "halfway"]
    abusers = [
        subprocess.Popen([sys.executable, str(ABUSER), running.address, p], stdout=subprocess.PIPE, text=True)
        for p in patterns
    ]
    try:
        for abuser in abusers:
            assert abuser.stdout.readline().strip() == "ready"
        assert health_status(running.address) == health_pb2.HealthCheckResponse.SERVING
        assert running.stop(timeout=120) == 0  # TimeoutError with the server's log if it hangs
    finally:
        for abuser in abusers:
            abuser.kill()
            abuser.wait()
    events = [json.loads(line)["event"] for line in running.log if line.startswith("{")]
    assert events[-2:] == ["stopping", "stopped"]


# Fixed default ports (8000, 8002) may be taken on a test machine: off unless a test names them (flags win).
QUIET_PORTS = {"ATOP_HTTP_PORT": "-1", "ATOP_METRICS_PORT": "-1"}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **QUIET_PORTS, **(env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=environment, timeout=300)


@pytest.mark.parametrize(
    "args,env,named",
    [
        (["--port", "70000"], {}, "--port: 70000 must be between 0 and 65535"),
        (["--metrics-port", "-2"], {}, "--metrics-port"),
        (["--device", "gpu"], {}, "--device: 'gpu' is not one of auto, cpu, cuda"),
        (["--max-queue-size", "0"], {}, "--max-queue-size: 0 must be at least 1"),
        (["--max-batch-size", "many"], {}, "--max-batch-size: 'many' is not an integer"),
        (["--grace-seconds", "nan"], {}, "--grace-seconds"),
        (["--log-level", "LOUD"], {}, "--log-level: 'LOUD' is not one of"),
        (["--max-message-mb", "4096"], {}, "--max-message-mb"),
        (["--grpc-use-ssl"], {}, "--grpc-use-ssl needs --grpc-server-cert"),
        (["--grpc-use-ssl-mutual"], {}, "without --grpc-use-ssl"),
        (["--model-repository", "/nonexistent"], {}, "--model-repository /nonexistent: no such folder"),
        ([], {"ATOP_PORT": "abc"}, "ATOP_PORT='abc': 'abc' is not an integer"),
        ([], {"ATOP_LOG_LEVEL": "chatty"}, "ATOP_LOG_LEVEL='chatty'"),
        ([], {"ATOP_MAX_DRAWS": "-1"}, "ATOP_MAX_DRAWS='-1': -1 must be at least 1"),
        ([], {"ATOP_AUTH_TOKENS": "short"}, "ATOP_AUTH_TOKENS: 1 token(s) shorter than 16 characters"),
    ],
)
def test_invalid_options_are_one_line_and_exit_2(args, env, named):
    result = run_cli(*args, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and named in result.stderr, result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_busy_ports_are_refused_in_one_line(server, tiny_repository):
    repository = str(tiny_repository)
    taken = str(server.grpc_port)
    result = run_cli("--model-repository", repository, "--port", taken, "--metrics-port", "-1")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"cannot bind gRPC to 127.0.0.1:{taken}" in result.stderr and "--port" in result.stderr
    assert health_status(server.address) == health_pb2.HealthCheckResponse.SERVING  # the first one is untouched

    taken = str(server.metrics_port)
    result = run_cli("--model-repository", repository, "--port", str(free_port()), "--metrics-port", taken)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"cannot bind metrics to 127.0.0.1:{taken}" in result.stderr and "--metrics-port" in result.stderr

    taken = str(server.http_port)
    result = run_cli("--model-repository", repository, "--port", str(free_port()), "--http-port", taken)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"cannot bind HTTP to 127.0.0.1:{taken}" in result.stderr and "--http-port" in result.stderr


@pytest.mark.slow
def test_missing_and_corrupt_models_are_one_line_and_exit_1(tiny_repository, tmp_path):
    result = run_cli("--model-repository", str(tiny_repository), "--models", "absent", "--port", "0")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "model 'absent' is not in" in result.stderr

    broken = tmp_path / "repository"
    shutil.copytree(tiny_repository / "tiny", broken / "tiny")
    model = next(broken.glob("tiny/*/model.onnx"))
    model.write_bytes(model.read_bytes()[:1000])  # truncated
    result = run_cli("--model-repository", str(broken), "--port", "0", "--metrics-port", "-1")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "is not a loadable ONNX model (truncated or corrupted?)" in result.stderr
