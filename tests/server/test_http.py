"""The KServe v2 REST API of a real server (the shipped model, onnxruntime, real sockets on free ports): the
stock tritonclient.http client, curl-style JSON requests, and broken, huge and slow requests, each answered
with its HTTP status and a JSON {"error": ...}; the server goes on."""

import base64
import io
import json
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from atop_server.app import Server, ServerConfig
from atop_server.batcher import BatcherConfig
from atop_server.cli import DEFAULT_REPOSITORY
from atop_server.core import CoreConfig
from atop_server.http import HttpConfig

MODEL = "atop_cifar10"
BODY_LIMIT = 1024 * 1024
TIMEOUT = 1.0  # seconds a body may take to arrive, and an idle connection may stay


def jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server():
    core = CoreConfig(DEFAULT_REPOSITORY, max_draws=4, batcher=BatcherConfig(max_batch_size=8))
    config = ServerConfig(
        core=core, port=0, metrics_port=-1, grace_seconds=5, max_message_bytes=BODY_LIMIT, http=HttpConfig(0, TIMEOUT)
    )
    running = Server(config)
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def url(server):
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(f"127.0.0.1:{server.http_port}") as c:
        yield c


def request(url: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a plain HTTP request, as curl would send it."""
    call = urllib.request.Request(url + path, data=body, headers=headers or {}, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(call, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def raw_exchange(port: int, data: bytes, wait: float = 30) -> bytes:
    """Send bytes on a fresh connection; everything the server answers until it closes (or `wait` passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        return received


def test_health_metadata_config_statistics_and_index(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert "classification" in client.get_server_metadata()["extensions"]
    metadata = client.get_model_metadata(MODEL)
    assert metadata["inputs"][1] == {"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [-1, 1]}
    assert metadata["outputs"][0] == {"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, 10]}
    assert client.get_model_metadata(MODEL, model_version="1")["name"] == MODEL
    config = client.get_model_config(MODEL)
    assert config["max_batch_size"] == 8 and config["parameters"]["max_draws"]["string_value"] == "4"
    assert client.get_model_repository_index() == [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]
    assert client.get_inference_statistics(MODEL)["model_stats"][0]["name"] == MODEL


def test_infer_binary_bytes_uint8_and_fp32_with_classification(client):
    images = [jpeg(i) for i in range(3)]
    encoded = triton.InferInput("IMAGE_BYTES", [3, 1], "BYTES")
    encoded.set_data_from_numpy(np.array(images, dtype=object).reshape(-1, 1), binary_data=True)
    top = client.infer(MODEL, [encoded], outputs=[triton.InferRequestedOutput("PROBABILITIES", class_count=3)])
    rows = top.as_numpy("PROBABILITIES")
    assert rows.shape == (3, 3)
    scores = [[float(item.decode().split(":")[0]) for item in row] for row in rows]
    assert all(row == sorted(row, reverse=True) and 0 < sum(row) <= 1 + 1e-5 for row in scores)
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32))) for data in images])
    pixels = triton.InferInput("IMAGE_UINT8", list(decoded.shape), "UINT8")
    pixels.set_data_from_numpy(decoded, binary_data=True)
    probabilities = client.infer(MODEL, [pixels], parameters={"draws": 2}).as_numpy("PROBABILITIES")
    assert probabilities.shape == (3, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-4)
    floats = triton.InferInput("IMAGE", [3, 3, 32, 32], "FP32")
    floats.set_data_from_numpy(decoded.transpose(0, 3, 1, 2).astype(np.float32) / 255, binary_data=False)
    as_json = client.infer(MODEL, [floats], outputs=[triton.InferRequestedOutput("PROBABILITIES", binary_data=False)])
    assert as_json.as_numpy("PROBABILITIES").shape == (3, 10)
    assert as_json.get_response()["outputs"][0]["datatype"] == "FP32"


def test_tritonclient_sees_the_servers_errors(client):
    junk = triton.InferInput("IMAGE_BYTES", [1, 1], "BYTES")
    junk.set_data_from_numpy(np.array([b"junk"], dtype=object).reshape(-1, 1))
    with pytest.raises(InferenceServerException, match="not in a known image format") as error:
        client.infer(MODEL, [junk])
    assert error.value.status() == "400"
    with pytest.raises(InferenceServerException, match="draws must be between 1 and 4"):
        client.infer(MODEL, [junk], parameters={"draws": 9})
    image = triton.InferInput("IMAGE_BYTES", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([jpeg(0)], dtype=object).reshape(-1, 1))
    # Triton's request timeout, microseconds: a request that cannot be served in 1 us is refused with 504,
    # one with a minute to spare is answered
    with pytest.raises(InferenceServerException, match="deadline passed before its image was decoded") as error:
        client.infer(MODEL, [image], timeout=1)
    assert error.value.status() == "504"
    assert client.infer(MODEL, [image], timeout=60_000_000).as_numpy("PROBABILITIES").shape == (1, 10)
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as error:
        client.get_model_metadata("nope")
    assert error.value.status() == "404"
    with pytest.raises(InferenceServerException, match="has no version '7'"):
        client.get_model_config(MODEL, model_version="7")


def test_curl_style_json_infer_with_a_base64_jpeg(url):
    body = {
        "id": "curl-1",
        "parameters": {"draws": 2},
        "inputs": [
            {"name": "IMAGE_BYTES", "shape": [1, 1], "datatype": "BYTES", "data": [base64.b64encode(jpeg(3)).decode()]}
        ],
        "outputs": [{"name": "PROBABILITIES", "parameters": {"classification": 2}}],
    }
    status, answer = request(url, f"/v2/models/{MODEL}/infer", json.dumps(body).encode())
    assert status == 200 and answer["id"] == "curl-1" and answer["model_name"] == MODEL
    (output,) = answer["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [1, 2] and len(output["data"]) == 2
    status, answer = request(
        url,
        f"/v2/models/{MODEL}/versions/1/infer",
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "IMAGE_UINT8",
                        "shape": [1, 32, 32, 3],
                        "datatype": "UINT8",
                        "data": [[[[7, 8, 9]] * 32] * 32],
                    }
                ]
            }
        ).encode(),
    )
    assert status == 200 and len(answer["outputs"][0]["data"]) == 10


@pytest.mark.parametrize(
    "body,message",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"{}", "lacks 'inputs'"),
        (
            b'{"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [1, 2]}]}',
            "needs 3072 values",
        ),
        (b'{"inputs": [{"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}', "base64"),
        (
            b'{"inputs": [{"name": "IMAGE_UINT8", "datatype": "UINT8", "shape": [1], "data": [300]}]}',
            "integers in [0, 255]",
        ),
        (b'{"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": [1], "data": [[1], [2, 3]]}]}', "rectangular"),
        (b'{"inputs": [{"name": "IMAGE", "datatype": "FP32", "shape": "1"}]}', "'shape' has the wrong type"),
        (b'{"inputs": [], "parameters": {"draws": [1]}}', "parameter 'draws' must be"),
        (b'{"inputs": [], "parameters": {"timeout": "soon"}}', "parameter 'timeout' must be a non-negative integer"),
        (b'{"inputs": [], "parameters": {"timeout": -5}}', "must be a non-negative integer, got -5"),
        (b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [0.5]}]}', "takes one of the inputs"),
    ],
)
def test_malformed_requests_are_400_with_a_json_error(url, body, message):
    status, answer = request(url, f"/v2/models/{MODEL}/infer", body, {"Content-Type": "application/json"})
    assert status == 400 and message in answer["error"], answer


def test_binary_extension_lengths_are_checked(url):
    header = json.dumps(
        {"inputs": [{"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}
    )
    image = jpeg(5)
    tensor = len(image).to_bytes(4, "little") + image
    path = f"/v2/models/{MODEL}/infer"
    for length, data, message in [
        ("-4", b"", "Inference-Header-Content-Length must be a byte count"),
        (str(len(header) + 1000), b"", "must be a byte count no larger than the body"),
        (str(len(header)), tensor[:9], "BYTES element 0 claims"),  # 9 bytes of a longer tensor
        (str(len(header)), b"1234", "exceeds the 4 bytes left"),
    ]:
        status, answer = request(url, path, header.encode() + data, {"Inference-Header-Content-Length": length})
        assert status == 400 and message in answer["error"], (length, answer)
    good = header.replace('"binary_data_size": 9', f'"binary_data_size": {len(tensor)}')
    status, answer = request(
        url, path, good.encode() + tensor + b"extra", {"Inference-Header-Content-Length": str(len(good))}
    )
    assert status == 400 and "5 bytes of binary data follow the JSON that no input claims" in answer["error"]
    status, answer = request(url, path, good.encode() + tensor, {"Inference-Header-Content-Length": str(len(good))})
    assert status == 200 and len(answer["outputs"][0]["data"]) == 10


def test_unknown_paths_and_methods_answer_json(url):
    assert request(url, "/v2/nothing-here") == (404, {"error": "no endpoint at /v2/nothing-here: see /v2/openapi.json"})
    assert request(url, "/v2/health/ready", b"{}") == (
        405,
        {"error": "POST is not allowed on /v2/health/ready (allowed: GET, HEAD)"},
    )


def test_huge_bodies_are_413_without_being_read(server, url):
    status, answer = request(url, f"/v2/models/{MODEL}/infer", b"x" * (BODY_LIMIT + 1))
    assert status == 413 and str(BODY_LIMIT) in answer["error"]
    # Announced but never sent: refused from the Content-Length alone, at once.
    started = time.monotonic()
    head = f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * BODY_LIMIT}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as connection:
        connection.sendall(head.encode())
        assert connection.recv(65536).startswith(b"HTTP/1.1 413") and time.monotonic() - started < TIMEOUT
    # Chunked, so no length up front: refused once the limit is passed.
    chunk = b"x" * 65536
    chunks = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * (BODY_LIMIT // len(chunk) + 2) + b"0\r\n\r\n"
    head = f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert raw_exchange(server.http_port, head.encode() + chunks, wait=10).startswith(b"HTTP/1.1 413")


def test_slow_and_lying_clients_are_cut_off_while_others_are_served(server, url):
    port = server.http_port
    # A body shorter than its Content-Length: 408 once the timeout passes, and the connection is closed.
    started = time.monotonic()
    head = f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    answer = raw_exchange(port, head.encode() + b'{"inputs": ', wait=30)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer
    assert TIMEOUT <= time.monotonic() - started < 20
    # A body longer than its Content-Length: the rest is read as the next request, which is no HTTP (the HTTP
    # parser answers that one itself, in plain text, and closes the connection).
    head = "POST /v2/health/ready HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
    answer = raw_exchange(port, head.encode() + b"{}garbage\r\n\r\n", wait=30)
    assert b" 400 Bad Request" in answer and b"Invalid method" in answer
    # Headers that never end (slowloris): other clients are answered meanwhile, and the connection is closed.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as stalled:
        stalled.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\n")
        assert request(url, "/v2/health/ready") == (200, {"ready": True})
        started = time.monotonic()
        assert stalled.recv(1024) == b""  # closed by the server
        assert time.monotonic() - started < 20


def test_http_requests_are_in_the_metrics(server, url):
    request(url, "/v2/models/nope/ready")
    samples = {
        tuple(sorted(sample.labels.items())): sample.value
        for family in server.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "atop_requests_total"
    }
    assert samples[(("code", "404"), ("method", "http.model_ready"), ("model", "unknown"))] >= 1
    assert samples[(("code", "200"), ("method", "http.infer"), ("model", MODEL))] >= 1


def test_the_openapi_description_covers_every_endpoint(server, url):
    status, description = request(url, "/v2/openapi.json")
    assert status == 200 and description["openapi"].startswith("3.")
    served = {
        (route.resource.canonical, route.method.lower())
        for route in server.http.app.router.routes()
        if route.method != "HEAD" and route.resource.canonical.startswith("/v2")  # the API, not the demo page
    }
    described = {(path, method) for path, item in description["paths"].items() for method in item}
    assert served == described


def test_the_demo_page_is_served_with_a_strict_policy_and_can_be_turned_off(url):
    with urllib.request.urlopen(url + "/", timeout=60) as page:
        assert b'<script src="demo/demo.js">' in page.read()
        assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    with urllib.request.urlopen(url + "/demo/demo.js", timeout=60) as script:
        assert b"v2/repository/index" in script.read()
    assert request(url, "/demo/../openapi.json")[0] == 404  # no way out of the static folder
    core = CoreConfig(DEFAULT_REPOSITORY, batcher=BatcherConfig(max_batch_size=2))
    without = Server(ServerConfig(core=core, port=0, metrics_port=-1, http=HttpConfig(0, demo=False)))
    try:
        status, answer = request(f"http://127.0.0.1:{without.http_port}", "/")
        assert status == 404 and "no endpoint at /" in answer["error"]
    finally:
        without.close()
