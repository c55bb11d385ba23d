"""The client reads a server's classification answer through the same bounds-checked BYTES framing the server
reads requests with (atop_proto.tensors): a truncated or padded answer is an error, never a short list."""

import pytest

from atop_clients.protocol import Prediction, parse_response
from atop_proto import grpc_service_pb2 as pb
from atop_proto.tensors import TensorFormatError, join_bytes_tensor

STRINGS = [b"0.900000:3:cat", b"0.100000:5:dog"]


def answer(raw: bytes) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name="CLASSIFICATION", datatype="BYTES", shape=[1, 2])
    response.raw_output_contents.append(raw)
    return response


def test_a_well_framed_answer_parses_best_first():
    assert parse_response(answer(join_bytes_tensor(STRINGS)), 1, 2) == [
        [Prediction("cat", 3, 0.9), Prediction("dog", 5, 0.1)]
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (join_bytes_tensor(STRINGS)[:-3], "claims 14 bytes"),  # truncated inside the last element
        (join_bytes_tensor(STRINGS) + b"\0\0", "bytes after its 2 elements"),  # padded
        (join_bytes_tensor(STRINGS[:1]), "ends inside the length of element 1"),  # one element short
    ],
)
def test_a_truncated_or_padded_answer_is_refused(raw, message):
    with pytest.raises(TensorFormatError, match=message):
        parse_response(answer(raw), 1, 2)
