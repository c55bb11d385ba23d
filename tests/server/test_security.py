"""TLS, mutual TLS and bearer tokens with real certificates over real sockets: the right CA is served, a wrong
CA or a missing client certificate is refused, tokens guard every RPC but health; the client refuses to send
a token in plaintext; the command line wires Triton's TLS flags."""

import io
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from certificates import Authority
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from atop_clients import AtopClient, ClientConfig
from atop_proto import grpc_service_pb2 as pb
from atop_proto import grpc_service_pb2_grpc as pb_grpc
from atop_server.app import Server, ServerConfig, TlsConfig
from atop_server.auth import AuthConfig
from atop_server.cli import parse_args
from atop_server.core import CoreConfig

TOKEN = "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def ca():
    return Authority("atop test CA")


@pytest.fixture(scope="module")
def server_pem(ca):
    return ca.issue("atop-serve", server=True)


def serve(repository, **options) -> Server:
    options.setdefault("metrics_port", -1)
    server = Server(ServerConfig(core=CoreConfig(repository, models=("tiny",)), port=0, **options))
    server.start()
    return server


@pytest.fixture(scope="module")
def tls_server(tiny_repository, ca, server_pem):
    tls, auth = TlsConfig(server_pem.cert, server_pem.key), AuthConfig(frozenset({TOKEN}))
    server = serve(tiny_repository, tls=tls, auth=auth, health_port=0)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_address(tls_server):
    return f"127.0.0.1:{tls_server.port}"


def ready(channel: grpc.Channel, token: str = "") -> bool:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    return stub.ServerReady(pb.ServerReadyRequest(), timeout=60, metadata=metadata).ready


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()


def test_tls_with_the_right_ca_and_refused_with_a_wrong_one(tls_address, ca):
    with grpc.secure_channel(tls_address, grpc.ssl_channel_credentials(ca.pem)) as channel:
        assert ready(channel, TOKEN)
    wrong = Authority("someone else")
    with grpc.secure_channel(tls_address, grpc.ssl_channel_credentials(wrong.pem)) as channel:
        assert code_of(lambda: ready(channel, TOKEN)) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(tls_address) as channel:  # plaintext to a TLS port
        assert code_of(lambda: ready(channel, TOKEN)) == grpc.StatusCode.UNAVAILABLE


def test_tokens_guard_every_rpc_but_health(tls_address, ca):
    with grpc.secure_channel(tls_address, grpc.ssl_channel_credentials(ca.pem)) as channel:
        assert code_of(lambda: ready(channel)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: ready(channel, "wrong-token-0123456789")) == grpc.StatusCode.UNAUTHENTICATED
        bare = (("authorization", TOKEN),)  # the right token, but not as a bearer token
        call = pb_grpc.GRPCInferenceServiceStub(channel).ServerReady
        assert (
            code_of(lambda: call(pb.ServerReadyRequest(), timeout=60, metadata=bare)) == grpc.StatusCode.UNAUTHENTICATED
        )
        stream = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([pb.ModelInferRequest()]), timeout=60)
        assert code_of(lambda: list(stream)) == grpc.StatusCode.UNAUTHENTICATED
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
        assert check.status == health_pb2.HealthCheckResponse.SERVING  # probes carry no token
        with pytest.raises(grpc.RpcError) as error:  # reflection lists the API: not without a token by default
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED

    config = ClientConfig(tls=True, root_certificates=ca.pem, token=TOKEN, retries=0)
    with AtopClient(tls_address, config) as client:
        buffer = io.BytesIO()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, "PNG")
        (predictions,) = client.classify([buffer.getvalue()], model="tiny", top_k=2)
        assert len(predictions) == 2


def test_plaintext_health_port_for_probes_serves_health_alone(tls_server):
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.health_port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=60)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert code_of(lambda: ready(channel, TOKEN)) == grpc.StatusCode.UNIMPLEMENTED


def test_mutual_tls_needs_a_client_certificate_from_the_ca(tiny_repository, ca, server_pem):
    tls = TlsConfig(server_pem.cert, server_pem.key, root_cert=ca.pem, mutual=True)
    server = serve(tiny_repository, tls=tls)
    address = f"127.0.0.1:{server.port}"
    try:
        client = ca.issue("client", server=False)
        credentials = grpc.ssl_channel_credentials(ca.pem, client.key, client.cert)
        with grpc.secure_channel(address, credentials) as channel:
            assert ready(channel)
        with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca.pem)) as channel:
            assert code_of(lambda: ready(channel)) == grpc.StatusCode.UNAVAILABLE
        stranger = Authority("someone else").issue("client", server=False)
        with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca.pem, stranger.key, stranger.cert)) as channel:
            assert code_of(lambda: ready(channel)) == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_public_reflection_and_the_client_refusing_plaintext_tokens(tiny_repository):
    server = serve(tiny_repository, auth=AuthConfig(frozenset({TOKEN}), public_reflection=True))
    address = f"127.0.0.1:{server.port}"
    try:
        with grpc.insecure_channel(address) as channel:
            assert "inference.GRPCInferenceService" in ProtoReflectionDescriptorDatabase(channel).get_services()
            assert code_of(lambda: ready(channel)) == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(ValueError, match="refusing to send a bearer token over plaintext"):
            ClientConfig(token=TOKEN)
        with AtopClient(address, ClientConfig(token=TOKEN, insecure_token=True)) as client:
            assert client.ready()
    finally:
        server.stop()


def scrape(port: int, token: str = "") -> tuple[int, str]:
    """The metrics port's status code and body for a GET /metrics, with the bearer token if given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.parametrize("public", [False, True])
def test_metrics_need_a_token_unless_public(tiny_repository, public):
    server = serve(tiny_repository, metrics_port=0, auth=AuthConfig(frozenset({TOKEN}), public_metrics=public))
    try:
        status, body = scrape(server.metrics_port, TOKEN)
        assert status == 200 and "atop_server_ready 1.0" in body
        for token in ("", "wrong-token-0123456789"):
            status, body = scrape(server.metrics_port, token)
            assert (status, "atop_server_ready" in body) == ((200, True) if public else (401, False))
        assert scrape(server.metrics_port, TOKEN)[0] == 200
    finally:
        server.stop()


def test_the_command_line_reads_tls_files_and_tokens(tiny_repository, tmp_path, ca, server_pem, monkeypatch):
    (tmp_path / "server.crt").write_bytes(server_pem.cert)
    (tmp_path / "server.key").write_bytes(server_pem.key)
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    (tmp_path / "tokens").write_text(f"# one per line\n{TOKEN}\n")
    monkeypatch.setenv("ATOP_AUTH_TOKENS", "another-token-0123456789")
    config = parse_args(
        [
            *("--model-repository", str(tiny_repository), "--grpc-use-ssl", "true"),
            *("--grpc-server-cert", str(tmp_path / "server.crt"), "--grpc-server-key", str(tmp_path / "server.key")),
            *("--grpc-root-cert", str(tmp_path / "ca.crt"), "--grpc-use-ssl-mutual"),
            *("--auth-token-file", str(tmp_path / "tokens"), "--public-metrics", "true"),
        ]
    )
    assert config.tls == TlsConfig(server_pem.cert, server_pem.key, ca.pem, mutual=True)
    assert config.auth == AuthConfig(frozenset({TOKEN, "another-token-0123456789"}), public_metrics=True)
