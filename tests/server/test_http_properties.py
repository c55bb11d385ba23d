"""Property tests of the REST API's request parsing: whatever JSON (or bytes) arrives, the parser builds a
request message or refuses it with InvalidInput (a 400 naming what is wrong), never anything else."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from atop_proto import grpc_service_pb2 as pb
from atop_server.errors import InvalidInput
from atop_server.http.tensors import infer_request, parse_body

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
)
tensor = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["IMAGE", "IMAGE_BYTES"]) | values,
        "datatype": st.sampled_from(["BYTES", "UINT8", "FP32", "INT64", "BOOL", "NOPE"]) | values,
        "shape": st.lists(st.integers(-2, 4), max_size=4) | values,
        "data": st.lists(st.integers(-300, 300) | st.floats() | st.text(max_size=8), max_size=12) | values,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-1, 40) | values}),
    },
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "id": values,
        "inputs": st.lists(tensor, max_size=2) | values,
        "outputs": st.lists(st.fixed_dictionaries({"name": values}, optional={"parameters": values}), max_size=2)
        | values,
        "parameters": st.dictionaries(st.sampled_from(["draws", "binary_data_output"]), values, max_size=2) | values,
    },
)


@settings(max_examples=400, deadline=None)
@given(documents, st.binary(max_size=40), st.none() | st.sampled_from(["0", "-1", "x", "99999"]))
def test_any_document_is_a_request_or_invalid_input(document, binary, header_length):
    text = json.dumps(document).encode()
    body, length = (text + binary, str(len(text))) if header_length is None else (text, header_length)
    try:
        parsed, rest = parse_body(body, length)
        request = infer_request(parsed, rest, "m", "")
    except InvalidInput as error:
        assert str(error)
        return
    assert isinstance(request, pb.ModelInferRequest)
    assert len(request.raw_input_contents) == len(request.inputs)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_are_json_or_invalid_input(body):
    try:
        document, rest = parse_body(body, None)
    except InvalidInput as error:
        assert "JSON" in str(error)
        return
    assert isinstance(document, dict) and rest == b""
