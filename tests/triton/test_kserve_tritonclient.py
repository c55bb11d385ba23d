"""atop-serve as a real process: stock tritonclient.grpc, the own API, health, reflection, errors, batching.

tritonclient's `inference.*` protobuf definitions and ours cannot share a process: the server runs in its
own process (as in production), and this folder runs in its own pytest process (see the Makefile).
"""

import io
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from echo_model import expected_probabilities
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serving import start_server
from tritonclient.utils import InferenceServerException

from atop_proto import classify_pb2, classify_pb2_grpc


def jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def bytes_input(items: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(items), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=object).reshape(-1, 1))
    return tensor


def array_input(array: np.ndarray, datatype: str) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.fixture(scope="module")
def server(tiny_repository):
    running = start_server(tiny_repository, "--max-batch-size", "32", "--max-draws", "8")
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    with triton.InferenceServerClient(server.address) as c:
        yield c


def test_health_metadata_and_config(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    assert "classification" in client.get_server_metadata().extensions
    metadata = client.get_model_metadata("tiny", as_json=True)
    assert metadata["inputs"] == [
        {"name": "IMAGE", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]},
        {"name": "IMAGE_BYTES", "datatype": "BYTES", "shape": ["-1", "1"]},
        {"name": "IMAGE_UINT8", "datatype": "UINT8", "shape": ["-1", "32", "32", "3"]},
    ]
    assert metadata["outputs"][0]["shape"] == ["-1", "10"]
    config = client.get_model_config("tiny_uint8", as_json=True)["config"]
    assert [(i["name"], i["data_type"], i["optional"]) for i in config["input"]] == [
        ("IMAGE", "TYPE_UINT8", True),
        ("IMAGE_BYTES", "TYPE_STRING", True),
    ]
    assert config["max_batch_size"] == 32 and config["parameters"]["max_draws"]["string_value"] == "8"
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {m["name"] for m in index} == {"tiny", "tiny_uint8"} and {m["state"] for m in index} == {"READY"}


def test_a_client_finds_the_encoded_image_input_from_model_metadata_alone(client):
    metadata = client.get_model_metadata("tiny", as_json=True)
    name = next(i["name"] for i in metadata["inputs"] if i["datatype"] == "BYTES")
    tensor = triton.InferInput(name, [2, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([jpeg(7), jpeg(8)], dtype=object).reshape(-1, 1))
    assert client.infer("tiny", [tensor]).as_numpy("PROBABILITIES").shape == (2, 10)


def test_failed_requests_are_counted_and_large_requests_split(client):
    def stats():
        return client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]

    before = stats()
    with pytest.raises(InferenceServerException, match="not in a known image format"):
        client.infer("tiny", [bytes_input([b"junk"])])
    with pytest.raises(InferenceServerException, match="draws must be between"):
        client.infer("tiny", [bytes_input([jpeg(0)])], parameters={"draws": 99})
    after = stats()
    failed = int(after["inference_stats"]["fail"].get("count", 0)) - int(
        before["inference_stats"]["fail"].get("count", 0)
    )
    assert failed == 2
    # 40 images over max_batch_size 32 (ModelConfig): split into executions of at most 32, not refused.
    images = np.random.default_rng(9).random((40, 3, 32, 32), dtype=np.float32)
    assert client.infer("tiny", [array_input(images, "FP32")]).as_numpy("PROBABILITIES").shape == (40, 10)
    assert max(int(b["batch_size"]) for b in stats()["batch_stats"]) <= 32


def test_encoded_jpeg_batch_with_classification_extension(client):
    images = [jpeg(i) for i in range(5)]
    result = client.infer(
        "tiny", [bytes_input(images)], outputs=[triton.InferRequestedOutput("PROBABILITIES", class_count=3)]
    )
    top = result.as_numpy("PROBABILITIES")
    assert top.shape == (5, 3)
    score, index, label = top[0, 0].decode().split(":")
    assert (
        0 <= float(score) <= 1
        and 0 <= int(index) < 10
        and label in {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
    )
    scores = [[float(s.decode().split(":")[0]) for s in row] for row in top]
    assert all(row == sorted(row, reverse=True) for row in scores)


@pytest.mark.parametrize("model", ["tiny", "tiny_uint8"])
def test_decoded_uint8_and_probabilities(client, model):
    images = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    result = client.infer(model, [array_input(images, "UINT8")])
    probabilities = result.as_numpy("PROBABILITIES")
    assert probabilities.shape == (7, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-4)


def test_fp32_input_and_randomized_answers(client):
    images = np.random.default_rng(1).random((4, 3, 32, 32), dtype=np.float32)
    first, second = (client.infer("tiny", [array_input(images, "FP32")]).as_numpy("PROBABILITIES") for _ in range(2))
    assert first.shape == (4, 10) and not np.array_equal(first, second)  # fresh RT draws on every call


def test_draws_parameter(server, client):
    """Each draw is a model pass of its own (how they are averaged: tests/server/test_core_rows.py)."""
    images = np.random.default_rng(2).random((2, 3, 32, 32), dtype=np.float32)
    images_run = ("atop_batch_size_sum", (("model", "tiny"),))
    before = scrape(server).get(images_run, 0)
    result = client.infer("tiny", [array_input(images, "FP32")], parameters={"draws": 8})
    probabilities = result.as_numpy("PROBABILITIES")
    assert probabilities.shape == (2, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert scrape(server)[images_run] - before == 2 * 8
    with pytest.raises(InferenceServerException, match="draws must be between 1 and 8") as error:
        client.infer("tiny", [array_input(images, "FP32")], parameters={"draws": 9})
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize(
    "build,model,message",
    [
        (lambda: bytes_input([b"not an image"]), "tiny", "not in a known image format"),
        (lambda: bytes_input([jpeg(0), b""]), "tiny", "image 1 is empty"),
        (lambda: array_input(np.zeros((1, 3, 32, 32), np.float32) + 2, "FP32"), "tiny", r"must lie in \[0, 1\]"),
        (lambda: array_input(np.full((1, 3, 32, 32), np.nan, np.float32), "FP32"), "tiny", "NaN"),
        (lambda: array_input(np.zeros((1, 3, 16, 16), np.float32), "FP32"), "tiny", r"must be \[N,3,32,32\]"),
        (lambda: array_input(np.zeros((1, 32, 32, 3), np.float32), "FP32"), "tiny", r"must be \[N,3,32,32\]"),
        (lambda: array_input(np.zeros((1, 3, 32, 32), np.float32), "FP32"), "tiny_uint8", "takes UINT8"),
        (lambda: array_input(np.zeros((1, 32, 32, 3), np.int32), "INT32"), "tiny", "datatype 'INT32'"),
    ],
)
def test_bad_inputs_are_invalid_argument_and_the_server_goes_on(client, build, model, message):
    with pytest.raises(InferenceServerException, match=message) as error:
        client.infer(model, [build()])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert client.infer("tiny", [bytes_input([jpeg(3)])]).as_numpy("PROBABILITIES").shape == (1, 10)


def test_wrong_names_and_unknown_models(client):
    wrong = triton.InferInput("PIXELS", [1, 1], "BYTES")
    wrong.set_data_from_numpy(np.array([jpeg(0)], dtype=object).reshape(1, 1))
    with pytest.raises(
        InferenceServerException, match=r"one of the inputs \['IMAGE', 'IMAGE_BYTES', 'IMAGE_UINT8'\], not 'PIXELS'"
    ):
        client.infer("tiny", [wrong])
    with pytest.raises(InferenceServerException, match="unknown model 'absent'") as error:
        client.infer("absent", [bytes_input([jpeg(0)])])
    assert error.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="has no version '7'"):
        client.get_model_metadata("tiny", model_version="7")


def scrape(server) -> dict[tuple[str, tuple], float]:
    """The metrics endpoint's samples: (name, sorted labels) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_concurrent_requests_are_batched_and_counted_in_the_metrics(server, client):
    ok = ("atop_requests_total", (("code", "OK"), ("method", "ModelInfer"), ("model", "tiny")))
    executions = ("atop_batch_size_count", (("model", "tiny"),))
    images_run = ("atop_batch_size_sum", (("model", "tiny"),))
    before, scraped_before = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0], scrape(server)
    images = np.random.default_rng(3).random((1, 3, 32, 32), dtype=np.float32)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: client.infer("tiny", [array_input(images, "FP32")]), range(64)))
    after, scraped = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0], scrape(server)
    inferences = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executed = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert inferences == 64 and executed < 64  # requests merged into shared executions
    assert scraped[ok] - scraped_before.get(ok, 0) == 64
    assert scraped[executions] - scraped_before.get(executions, 0) == executed  # one observation per execution
    assert scraped[images_run] - scraped_before.get(images_run, 0) == 64


def test_metrics_port_answers_only_metrics(server):
    for path in ("/", "/v2/health/ready", "/metricsx"):  # a probe aimed here by mistake must fail
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}{path}")
        assert missing.value.code == 404


def test_grpc_health_and_reflection(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "atop.v1.Classifier"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert {"inference.GRPCInferenceService", "atop.v1.Classifier", "grpc.health.v1.Health"} <= set(services)


def test_own_api_unary_and_stream(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = classify_pb2_grpc.ClassifierStub(channel)
        response = stub.Classify(
            classify_pb2.ClassifyRequest(model="tiny", images=[jpeg(i) for i in range(3)], top_k=2, request_id="req-1")
        )
        assert response.request_id == "req-1" and response.model == "tiny" and len(response.results) == 3
        best = response.results[0].predictions
        assert len(best) == 2 and best[0].score >= best[1].score and best[0].label
        with pytest.raises(grpc.RpcError) as error:
            stub.Classify(classify_pb2.ClassifyRequest(images=[b"junk"]))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image 0" in error.value.details()

        requests = [classify_pb2.ClassifyRequest(images=[jpeg(i)], request_id=str(i)) for i in range(4)]
        requests[1] = classify_pb2.ClassifyRequest(images=[b"junk"], request_id="bad")
        answers = list(stub.ClassifyStream(iter(requests)))
        assert [a.request_id for a in answers] == ["0", "bad", "2", "3"]
        assert answers[1].error and not answers[1].results and all(len(a.results) == 1 for a in answers[2:])


def test_deadline_exceeded(client):
    images = np.random.default_rng(4).random((32, 3, 32, 32), dtype=np.float32)
    with pytest.raises(InferenceServerException) as error:
        client.infer("tiny", [array_input(images, "FP32")], parameters={"draws": 8}, client_timeout=0.001)
    assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert client.is_server_ready()


def test_overload_is_resource_exhausted_at_once(tiny_repository):
    running = start_server(tiny_repository, "--models", "tiny", "--max-batch-size", "8", "--max-queue-size", "16")
    try:
        with triton.InferenceServerClient(running.address) as c:
            images = np.random.default_rng(5).random((8, 3, 32, 32), dtype=np.float32)

            def call(_):
                try:
                    c.infer("tiny", [array_input(images, "FP32")], parameters={"draws": 2})
                    return "OK"
                except InferenceServerException as e:
                    return e.status()

            with ThreadPoolExecutor(12) as pool:
                codes = list(pool.map(call, range(24)))
            assert "StatusCode.RESOURCE_EXHAUSTED" in codes and "OK" in codes
            assert set(codes) <= {"OK", "StatusCode.RESOURCE_EXHAUSTED"}
            assert c.is_server_ready()
    finally:
        assert running.stop() == 0


def test_sigterm_drains_a_request_in_flight_then_exits_0(echo_repository):
    """SIGTERM once the server has started the request (the slow model has run its first parts: its statistics
    say so), not merely once the client sent it: the whole answer still comes, exact, then exit 0."""
    running = start_server(echo_repository, "--models", "slow", "--max-batch-size", "4")
    images = np.random.default_rng(6).random((16, 3, 32, 32), dtype=np.float32)  # x 16 draws: 64 executions
    with triton.InferenceServerClient(running.address) as c, ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            lambda: c.infer("slow", [array_input(images, "FP32")], parameters={"draws": 16}, client_timeout=120)
        )
        while not int(c.get_inference_statistics("slow", as_json=True)["model_stats"][0].get("execution_count", 0)):
            threading.Event().wait(0.005)  # until its first part has run
        running.process.terminate()  # SIGTERM
        assert not answer.done()  # truly in flight: started, not answered
        probabilities = answer.result(timeout=120).as_numpy("PROBABILITIES")
    np.testing.assert_allclose(probabilities, expected_probabilities(images), atol=1e-6)
    assert running.process.wait(60) == 0
    events = [json.loads(line)["event"] for line in running.log if line.startswith("{")]
    assert events[-2:] == ["stopping", "stopped"]
