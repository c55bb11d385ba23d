"""KServe requests to the echo models (tests/echo_model.py) and their answers, as raw FP32 tensors. Apart from
echo_model.py, which tests/triton imports too: tritonclient's protobuf names clash with atop_proto's."""

import numpy as np

from atop_proto import grpc_service_pb2 as pb


def infer_request(images: np.ndarray, model: str = "echo", request_id: str = "") -> pb.ModelInferRequest:
    """A KServe ModelInferRequest of float [N,3,H,W] images as a raw FP32 tensor."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="IMAGE", datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(images.astype("<f4").tobytes())
    return request


def answered_probabilities(response: pb.ModelInferResponse) -> np.ndarray:
    """The PROBABILITIES tensor of a ModelInferResponse."""
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))
