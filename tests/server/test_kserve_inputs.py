"""KServe inference over real gRPC, checked value by value on the deterministic echo models
(tests/echo_model.py): typed `contents` as well as raw tensors, UINT8 values above 255, the bound on images
per request (both APIs), the classification extension's strings, ModelStreamInfer's answers in order (a failed
request answered with its id and the stream going on), and deadlines the server itself enforces: a request
that cannot finish before its deadline is refused at once, long before the client would give up, and the
model never runs for it."""

import time

import grpc
import numpy as np
import pytest
from echo_model import LABELS, expected_probabilities
from echo_requests import answered_probabilities, infer_request

from atop_proto import classify_pb2, classify_pb2_grpc
from atop_proto import grpc_service_pb2 as pb
from atop_proto import grpc_service_pb2_grpc as pb_grpc
from atop_server.app import Server, ServerConfig
from atop_server.batcher import BatcherConfig
from atop_server.codec import split_bytes_tensor
from atop_server.core import CoreConfig

MAX_IMAGES = 4


@pytest.fixture(scope="module")
def channel(echo_repository):
    core = CoreConfig(echo_repository, models=("echo", "echo_uint8"), max_images_per_request=MAX_IMAGES)
    server = Server(ServerConfig(core=core, port=0, metrics_port=-1, grace_seconds=5))
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel
    server.stop()


def infer(channel: grpc.Channel, request: pb.ModelInferRequest, timeout: float = 60) -> np.ndarray:
    return answered_probabilities(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout))


def refusal(channel: grpc.Channel, request: pb.ModelInferRequest, timeout: float | None = 60) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=timeout)
    return error.value


def typed_request(model: str, datatype: str, shape: tuple[int, ...], values: list) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="IMAGE", datatype=datatype, shape=list(shape))
    getattr(tensor.contents, {"FP32": "fp32_contents", "UINT8": "uint_contents"}[datatype]).extend(values)
    return request


def test_typed_fp32_and_uint8_contents_reach_the_model_in_order(channel):
    images = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    answer = infer(channel, typed_request("echo", "FP32", images.shape, images.ravel().tolist()))
    np.testing.assert_allclose(answer, expected_probabilities(images), atol=1e-6)

    pixels = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    unit = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255
    for model in ("echo_uint8", "echo"):  # the UINT8 graph, and a float graph given UINT8 pixels
        answer = infer(channel, typed_request(model, "UINT8", pixels.shape, pixels.ravel().tolist()))
        np.testing.assert_allclose(answer, expected_probabilities(unit), atol=1e-6, err_msg=model)


def test_typed_contents_that_do_not_fit_are_invalid(channel):
    values = [0] * (32 * 32 * 3)
    values[5] = 300  # a UINT8 pixel cannot hold it: wrapping it to 44 would classify another image
    error = refusal(channel, typed_request("echo_uint8", "UINT8", (1, 32, 32, 3), values))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "UINT8 contents hold values above 255"
    error = refusal(channel, typed_request("echo", "FP32", (2, 3, 32, 32), [0.5] * (3 * 32 * 32)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "FP32 input of shape [2, 3, 32, 32] holds 3072 values"


def test_images_per_request_are_bounded_in_both_apis(channel):
    images = np.full((MAX_IMAGES, 3, 32, 32), 0.5, np.float32)
    assert infer(channel, infer_request(images)).shape == (MAX_IMAGES, len(LABELS))  # the limit itself is served

    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="IMAGE_BYTES", datatype="BYTES", shape=[MAX_IMAGES + 1, 1])
    request.inputs[0].contents.bytes_contents.extend([b"not decoded"] * (MAX_IMAGES + 1))
    error = refusal(channel, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # refused before anything is decoded
    assert error.details() == f"{MAX_IMAGES + 1} images exceed the limit of {MAX_IMAGES} per request"

    classify = classify_pb2_grpc.ClassifierStub(channel)
    with pytest.raises(grpc.RpcError) as own:
        classify.Classify(classify_pb2.ClassifyRequest(model="echo", images=[b"x"] * (MAX_IMAGES + 1)), timeout=60)
    assert own.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert own.value.details() == f"{MAX_IMAGES + 1} images exceed the limit of {MAX_IMAGES} per request"


def test_the_classification_extension_ranks_every_image_best_first(channel):
    images = np.random.default_rng(3).random((2, 3, 32, 32), dtype=np.float32)
    request = infer_request(images)
    request.outputs.add(name="PROBABILITIES").parameters["class_count"].int64_param = 2
    response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert list(response.outputs[0].shape) == [2, 2] and response.outputs[0].datatype == "BYTES"
    expected = [
        f"{row[i]:f}:{i}:{LABELS[i]}".encode()
        for row in expected_probabilities(images).astype(np.float32)
        for i in np.argsort(-row, kind="stable")[:2]
    ]
    assert split_bytes_tensor(response.raw_output_contents[0], 4) == expected


def test_a_stream_answers_each_request_in_order_and_goes_on_after_a_failure(channel):
    images = [np.random.default_rng(seed).random((seed + 1, 3, 32, 32), dtype=np.float32) for seed in range(3)]
    bad = infer_request(images[0], request_id="bad")
    bad.parameters["draws"].int64_param = 99
    requests = [
        infer_request(images[0], request_id="a"),
        bad,
        infer_request(images[1], request_id="b"),
        infer_request(images[2], request_id="c"),
    ]
    answers = list(pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests), timeout=60))
    assert [(a.infer_response.id, a.error_message.split(":")[0]) for a in answers] == [
        ("a", ""),
        ("bad", "INVALID_ARGUMENT"),
        ("b", ""),
        ("c", ""),
    ]
    for answer, sent in zip([answers[0], *answers[2:]], images, strict=True):
        np.testing.assert_allclose(
            answered_probabilities(answer.infer_response), expected_probabilities(sent), atol=1e-6
        )


def executions(channel: grpc.Channel, model: str) -> int:
    request = pb.ModelStatisticsRequest(name=model)
    stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(request, timeout=60)
    return stats.model_stats[0].execution_count


def test_the_server_refuses_at_once_what_cannot_finish_before_the_deadline(echo_repository):
    # `slow` takes milliseconds per image, as measured at warm-up: 64 images x 16 draws need seconds, more than
    # the client's deadline. The server must say so at once (a server that ignored the deadline would start
    # the work and be cut off by the client's own timer a second later, having run the model for nothing).
    core = CoreConfig(echo_repository, models=("slow",), batcher=BatcherConfig(max_batch_size=4))
    server = Server(ServerConfig(core=core, port=0, metrics_port=-1, grace_seconds=5))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            images = np.random.default_rng(2).random((64, 3, 32, 32), dtype=np.float32)
            request = infer_request(images, "slow")
            request.parameters["draws"].int64_param = 16
            started = time.monotonic()
            error = refusal(channel, request, timeout=1.0)
            answered = time.monotonic() - started
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert error.details().startswith("1024 images need about") and answered < 0.5, error.details()
            assert executions(channel, "slow") == 0
            # the same from Triton's request parameter "timeout" (microseconds) without a gRPC deadline
            request.parameters["timeout"].int64_param = 1_000_000
            error = refusal(channel, request, timeout=None)
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert error.details().startswith("1024 images need about"), error.details()
            assert executions(channel, "slow") == 0
    finally:
        server.stop()
