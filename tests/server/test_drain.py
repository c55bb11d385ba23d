"""Stopping the server (what SIGTERM does) with a request truly in flight: the server has started it (its
execution is held at a gate), then stop() begins. Probes see NOT_SERVING (the health port, and the probe
command `python -m atop_server.healthcheck`), new calls are refused, the request in flight still gets its
whole answer, and only then does stop() return."""

import threading

import grpc
import numpy as np
import pytest
from echo_model import expected_probabilities
from echo_requests import answered_probabilities, infer_request
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import ExecutionGate

from atop_proto import grpc_service_pb2 as pb
from atop_proto import grpc_service_pb2_grpc as pb_grpc
from atop_server import healthcheck
from atop_server.app import Server, ServerConfig
from atop_server.core import CoreConfig

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def gated_server(echo_repository):
    config = ServerConfig(
        core=CoreConfig(echo_repository, models=("echo",)), port=0, metrics_port=-1, health_port=0, grace_seconds=60
    )
    server = Server(config)
    gate = ExecutionGate(forward=server.core.on_execution)  # the metrics still see every execution
    server.core.on_execution = gate
    server.start()
    yield server, gate
    gate.opened.set()
    if not server.stopped.is_set():
        server.stop()


def refused_once_stopping(stub: pb_grpc.GRPCInferenceServiceStub) -> grpc.RpcError:
    """The first ServerReady call the stopping server refuses (it stops taking calls just after NOT_SERVING)."""
    for _ in range(2000):
        try:
            stub.ServerReady(pb.ServerReadyRequest(), timeout=60)
        except grpc.RpcError as error:
            return error
        threading.Event().wait(0.005)
    raise AssertionError("the stopping server kept taking new calls")


def test_stop_drains_the_request_in_flight_refuses_new_calls_and_reports_not_serving(gated_server, capsys, monkeypatch):
    server, gate = gated_server
    monkeypatch.setenv("ATOP_HEALTH_PORT", str(server.health_port))  # the probe's default: the health port
    address, health_address = f"127.0.0.1:{server.port}", f"127.0.0.1:{server.health_port}"
    images = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    with grpc.insecure_channel(address) as channel, grpc.insecure_channel(health_address) as probe_channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(probe_channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == SERVING
        in_flight = stub.ModelInfer.future(infer_request(images, request_id="in-flight"), timeout=120)
        assert gate.entered.wait(60)  # the server has run the model for it and not answered yet
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        try:
            assert next(watch).status == NOT_SERVING
            with pytest.raises(SystemExit) as probe:
                healthcheck.main([])
            assert probe.value.code == 1 and capsys.readouterr().out.strip() == "NOT_SERVING"
            assert refused_once_stopping(stub).code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(infer_request(images), timeout=60)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert in_flight.running() and stopping.is_alive()  # the drain waits for the request in flight
        finally:
            gate.opened.set()
        response = in_flight.result(timeout=60)
        np.testing.assert_allclose(answered_probabilities(response), expected_probabilities(images), atol=1e-6)
        stopping.join(60)
        assert not stopping.is_alive() and server.stopped.is_set()
        watch.cancel()
    assert gate.images == [3]  # the refused request never reached the model


def test_the_probe_command_says_serving_or_why_not(echo_repository, capsys, monkeypatch):
    server = Server(ServerConfig(core=CoreConfig(echo_repository, models=("echo",)), port=0, metrics_port=-1))
    server.start()
    address = f"127.0.0.1:{server.port}"
    monkeypatch.setenv("ATOP_PORT", str(server.port))  # the probe's default without a health port
    monkeypatch.setenv("ATOP_HEALTH_PORT", "-1")
    try:
        with pytest.raises(SystemExit) as healthy:
            healthcheck.main(["--service", "inference.GRPCInferenceService"])
        assert healthy.value.code == 0 and capsys.readouterr().out.strip() == "SERVING"
        with pytest.raises(SystemExit) as unknown:
            healthcheck.main(["--address", address, "--service", "no.such.Service"])
        assert unknown.value.code == 1 and "unhealthy: NOT_FOUND" in capsys.readouterr().err
    finally:
        server.stop()
    with pytest.raises(SystemExit) as gone:
        healthcheck.main(["--address", address, "--timeout", "5"])
    assert gone.value.code == 1 and "unhealthy: UNAVAILABLE" in capsys.readouterr().err
