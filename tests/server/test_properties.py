"""Property tests (hypothesis): the BYTES codec round-trips and refuses every malformed buffer with
InvalidInput, raw tensors of any declared shape either fit or are refused, and whatever a KServe request
holds, the service answers it or refuses it with a serving error (a status code), never anything else."""

import asyncio
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from atop_proto import grpc_service_pb2 as pb
from atop_proto.tensors import DATATYPES, join_bytes_tensor
from atop_server.batcher import BatcherConfig
from atop_server.codec import array_from_raw, split_bytes_tensor
from atop_server.core import Call, CoreConfig, InferenceCore
from atop_server.errors import InvalidInput, ServeError
from atop_server.grpc_errors import HANDLED
from atop_server.kserve import KServeService, _parameter
from atop_server.metrics import Metrics

items = st.lists(st.binary(max_size=64), max_size=12)


@given(items)
def test_bytes_tensor_round_trips(elements):
    assert split_bytes_tensor(join_bytes_tensor(elements), len(elements)) == elements


@given(st.binary(max_size=96), st.integers(0, 8))
def test_any_buffer_splits_or_is_invalid(buffer, count):
    try:
        elements = split_bytes_tensor(buffer, count)
    except InvalidInput:
        return
    assert len(elements) == count and join_bytes_tensor(elements) == buffer


@given(items, st.integers(1, 4))
def test_a_truncated_or_padded_tensor_is_invalid(elements, cut):
    buffer = join_bytes_tensor([*elements, b"x"])
    with pytest.raises(InvalidInput):
        split_bytes_tensor(buffer[:-cut], len(elements) + 1)
    with pytest.raises(InvalidInput, match="bytes after its"):
        split_bytes_tensor(buffer + b"\0" * cut, len(elements) + 1)


shapes = st.lists(st.one_of(st.integers(1, 4), st.integers(1, 2**62)), min_size=1, max_size=4)


@given(st.sampled_from([*DATATYPES, "BYTES", "FP8", ""]), shapes, st.binary(max_size=256))
def test_raw_tensors_fit_their_shape_or_are_invalid(datatype, shape, buffer):
    try:
        array = array_from_raw(buffer, datatype, tuple(shape))
    except InvalidInput:
        return
    assert list(array.shape) == shape and array.nbytes == len(buffer)


parameters = st.one_of(
    st.builds(lambda v: pb.InferParameter(int64_param=v), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda v: pb.InferParameter(string_param=v), st.text(max_size=8)),
    st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: pb.InferParameter(double_param=v), st.floats()),
)


@given(parameters)
def test_integer_parameters_parse_or_are_invalid(value):
    try:
        parsed = _parameter({"draws": value}, "draws", 1)
    except InvalidInput:
        return
    assert isinstance(parsed, int)


@pytest.fixture(scope="module")
def service(tiny_repository):
    batcher = BatcherConfig(max_batch_size=8, max_queue_size=64, max_client_queue_size=32)
    core = InferenceCore(CoreConfig(tiny_repository, models=("tiny",), max_images_per_request=8, batcher=batcher))
    core.start()
    yield KServeService(core, Metrics(), 8)
    core.close()


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = png_bytes()


@st.composite
def requests(draw) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=draw(st.sampled_from(["tiny", "", "other"])))
    for _ in range(draw(st.integers(0, 2))):
        datatype = draw(st.sampled_from(["BYTES", "UINT8", "FP32", "INT64", "FP16"]))
        shape = draw(st.lists(st.sampled_from([-1, 0, 1, 2, 3, 32, 2**40]), min_size=0, max_size=4))
        request.inputs.add(name=draw(st.sampled_from(["IMAGE", "PIXELS"])), datatype=datatype, shape=shape)
        if draw(st.booleans()):
            count = shape[0] if shape and 0 < shape[0] <= 3 else 1
            raw = join_bytes_tensor([draw(st.sampled_from([PNG, b"", b"junk"])) for _ in range(count)])
            if datatype != "BYTES":
                raw = draw(st.binary(max_size=64)) if draw(st.booleans()) else bytes(3 * 32 * 32 * 4 * count)
            request.raw_input_contents.append(raw)
    if draw(st.booleans()):
        request.parameters["draws"].CopyFrom(draw(parameters))
    if draw(st.booleans()):
        output = request.outputs.add(name=draw(st.sampled_from(["PROBABILITIES", "LOGITS"])))
        output.parameters["classification"].int64_param = draw(st.integers(-1, 12))
    return request


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests())
def test_every_request_is_answered_or_refused_with_a_status(service, request):
    try:
        response = asyncio.run(service.infer(request, Call()))
    except HANDLED as error:
        assert isinstance(error, ServeError | LookupError) and str(error)
        return
    assert response.outputs and len(response.raw_output_contents) == len(response.outputs)
    assert response.outputs[0].shape[0] == request.inputs[0].shape[0]
