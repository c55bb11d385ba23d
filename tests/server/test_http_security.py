"""The REST port shares gRPC's TLS and bearer tokens (real certificates, real sockets): the CA's certificate is
served, mutual TLS wants a client certificate, tokens guard every endpoint but health; and the command line
wires --http-port (one-line errors, a busy port refused)."""

import json
import socket
import ssl
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from certificates import Authority

from atop_server.app import Server, ServerConfig, TlsConfig
from atop_server.auth import AuthConfig
from atop_server.batcher import BatcherConfig
from atop_server.cli import DEFAULT_REPOSITORY, parse_args
from atop_server.core import CoreConfig
from atop_server.http import HttpConfig

TOKEN = "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def ca():
    return Authority("atop test CA")


def serve(tls: TlsConfig, auth: AuthConfig | None = None) -> Server:
    core = CoreConfig(DEFAULT_REPOSITORY, batcher=BatcherConfig(max_batch_size=2))
    server = Server(
        ServerConfig(
            core=core, port=0, metrics_port=-1, grace_seconds=5, tls=tls, auth=auth or AuthConfig(), http=HttpConfig(0)
        )
    )
    server.start()
    return server


def get(port: int, path: str, context: ssl.SSLContext, token: str = "") -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    call = urllib.request.Request(f"https://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(call, timeout=60, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_tls_and_tokens_guard_the_rest_api_but_health(ca):
    pem = ca.issue("atop-serve", server=True)
    server = serve(TlsConfig(pem.cert, pem.key), AuthConfig(frozenset({TOKEN})))
    try:
        trusting = ssl.create_default_context(cadata=ca.pem.decode())
        assert get(server.http_port, "/v2/health/ready", trusting) == (200, {"ready": True})
        assert get(server.http_port, "/v2/models/atop_cifar10", trusting)[0] == 401
        assert get(server.http_port, "/v2/models/atop_cifar10", trusting, "wrong-token-0123456789")[0] == 401
        assert get(server.http_port, "/v2/models/atop_cifar10", trusting, TOKEN)[1]["name"] == "atop_cifar10"
        stranger = ssl.create_default_context(cadata=Authority("someone else").pem.decode())
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            get(server.http_port, "/v2/health/ready", stranger)
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as plain:  # plaintext to TLS
            plain.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200 OK" not in plain.recv(1024)
    finally:
        server.stop()


def test_mutual_tls_wants_a_client_certificate_from_the_ca(ca):
    pem = ca.issue("atop-serve", server=True)
    server = serve(TlsConfig(pem.cert, pem.key, root_cert=ca.pem, mutual=True))
    try:
        client = ca.issue("client", server=False)
        context = ssl.create_default_context(cadata=ca.pem.decode())
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "c.pem").write_bytes(client.cert)
            Path(folder, "k.pem").write_bytes(client.key)
            context.load_cert_chain(Path(folder, "c.pem"), Path(folder, "k.pem"))
        assert get(server.http_port, "/v2/health/live", context) == (200, {"live": True})
        without = ssl.create_default_context(cadata=ca.pem.decode())
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            get(server.http_port, "/v2/health/live", without)
    finally:
        server.stop()


def test_http_port_options(tmp_path):
    assert parse_args(["--http-port", "0"]).http == HttpConfig(0, 30.0, demo=True)
    assert parse_args(["--http-port", "-1"]).http is None
    assert parse_args([]).http == HttpConfig(8000, 30.0)
    assert parse_args(["--no-demo"]).http == parse_args(["--demo", "false"]).http == HttpConfig(8000, demo=False)
    for args, named in [
        (["--http-port", "-2"], "--http-port: -2 must be between -1 and 65535"),
        (["--http-port", "8001"], "--port and --http-port are both 8001"),
        (["--http-timeout-seconds", "0"], "--http-timeout-seconds"),
    ]:
        result = subprocess.run([sys.executable, "-m", "atop_server.cli", *args], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and named in result.stderr, result.stderr


def test_a_busy_http_port_is_refused_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        command = [sys.executable, "-m", "atop_server.cli", "--port", "0", "--metrics-port", "-1", "--http-port", port]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert f"cannot bind HTTP to 127.0.0.1:{port}" in result.stderr and "--http-port" in result.stderr
