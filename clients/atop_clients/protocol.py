"""KServe v2 requests and responses for image classification, shared by the sync and asyncio clients.

The model's declared inputs decide what is sent: encoded images as they are when it takes BYTES (atop-serve
advertises a BYTES input for every model: ~12x less traffic than FP32 pixels at 32 px), else UINT8
[-1,H,W,3] or FP32 [-1,3,H,W] decoded and resized here. So any KServe v2 server serving a compatible model
(stock Triton with our ONNX repository, say) works.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from atop_proto import grpc_service_pb2 as pb
from atop_proto.images import rgb_array
from atop_proto.tensors import join_bytes_tensor, split_bytes_tensor


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float


@dataclass(frozen=True)
class Purified:
    """What the defense did to one image (atop-serve's optional outputs), beside its predictions."""

    predictions: list[Prediction]
    stability: float  # the share of the draws whose top-1 was the averaged top-1 (1.0 with one draw)
    rt_image: np.ndarray  # float32 [3,H,W] in [0,1]: the first draw's randomly transformed image
    purified: np.ndarray  # float32 [3,H,W] in [0,1]: what the purifier made of it, as the classifier saw it


IMAGE_OUTPUTS = ("RT_IMAGE", "PURIFIED", "STABILITY")


@dataclass(frozen=True)
class ModelInput:
    model: str
    name: str
    datatype: str  # BYTES, UINT8 or FP32
    height: int = 0
    width: int = 0
    output: str = ""
    classes: int = 0  # the output's width (0: not declared): the largest top-k

    @classmethod
    def from_metadata(cls, metadata: pb.ModelMetadataResponse) -> ModelInput:
        """The cheapest input the model declares (a request supplies one): encoded images, else UINT8 pixels,
        else FP32 pixels."""
        if not metadata.inputs or not metadata.outputs:
            raise ValueError(f"model {metadata.name} is not an image classifier (image inputs, an output)")
        output = metadata.outputs[0]
        classes = max(int(output.shape[-1]), 0) if output.shape else 0  # -1: a dynamic width, not declared
        common = {"model": metadata.name, "output": output.name, "classes": classes}
        candidates = []
        for tensor in metadata.inputs:
            shape = [int(d) for d in tensor.shape]
            if tensor.datatype == "BYTES":
                candidates.append(cls(name=tensor.name, datatype="BYTES", **common))
            elif tensor.datatype == "UINT8" and len(shape) == 4 and shape[3] == 3:
                candidates.append(cls(name=tensor.name, datatype="UINT8", height=shape[1], width=shape[2], **common))
            elif tensor.datatype == "FP32" and len(shape) == 4 and shape[1] == 3:
                candidates.append(cls(name=tensor.name, datatype="FP32", height=shape[2], width=shape[3], **common))
        if not candidates:
            declared = ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in metadata.inputs)
            raise ValueError(f"model {metadata.name} takes no image input ({declared})")
        return min(candidates, key=lambda c: ["BYTES", "UINT8", "FP32"].index(c.datatype))


class ImageError(ValueError):
    """An input the client itself cannot decode (when it must send decoded pixels)."""


def decode(data: bytes, height: int, width: int, index: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return rgb_array(image, height, width)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as error:
        raise ImageError(f"image {index} cannot be decoded: {type(error).__name__}") from None


def infer_request(
    spec: ModelInput,
    images: list[bytes],
    top_k: int,
    request_id: str = "",
    draws: int = 1,
    return_purified: bool = False,
) -> pb.ModelInferRequest:
    """draws > 1 asks atop-serve to average each image's probabilities over that many RT draws (the
    `draws` request parameter; other KServe servers ignore or refuse it); return_purified asks for its
    optional outputs too (IMAGE_OUTPUTS)."""
    request = pb.ModelInferRequest(model_name=spec.model, id=request_id)
    if draws != 1:
        request.parameters["draws"].int64_param = draws
    if spec.datatype == "BYTES":
        raw = join_bytes_tensor(images)
        shape = [len(images), 1]
    else:
        pixels = np.stack([decode(data, spec.height, spec.width, i) for i, data in enumerate(images)])
        if spec.datatype == "FP32":
            pixels = pixels.transpose(0, 3, 1, 2).astype("<f4") / np.float32(255)
        raw, shape = pixels.tobytes(), list(pixels.shape)
    request.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
    request.raw_input_contents.append(raw)
    output = request.outputs.add(name=spec.output)
    output.parameters["classification"].int64_param = top_k
    for name in IMAGE_OUTPUTS if return_purified else ():
        request.outputs.add(name=name)
    return request


def parse_response(response: pb.ModelInferResponse, count: int, top_k: int) -> list[list[Prediction]]:
    """The classification extension's BYTES [N,k] "score:index:label" strings -> predictions, best first."""
    if not response.raw_output_contents:
        items = list(response.outputs[0].contents.bytes_contents)
        if len(items) != count * top_k:
            raise ValueError(f"expected {count}x{top_k} classifications, got {len(items)}")
    else:  # the framing says how many elements there are; a truncated or padded buffer is a TensorFormatError
        items = split_bytes_tensor(response.raw_output_contents[0], count * top_k)
    predictions = []
    for item in items:
        score, index, label = item.decode().split(":", 2)
        predictions.append(Prediction(label, int(index), float(score)))
    return [predictions[i * top_k : (i + 1) * top_k] for i in range(count)]


def parse_purified(response: pb.ModelInferResponse, count: int, top_k: int) -> list[Purified]:
    """The predictions with the optional outputs asked for by infer_request(..., return_purified=True)."""
    raw = dict(zip((o.name for o in response.outputs), response.raw_output_contents, strict=True))
    shapes = {o.name: list(o.shape) for o in response.outputs}
    missing = [name for name in IMAGE_OUTPUTS if name not in raw]
    if missing:
        raise ValueError(f"the server did not return {missing} (a model exported without them, or not atop-serve)")
    arrays = {name: np.frombuffer(raw[name], "<f4").reshape(shapes[name]) for name in IMAGE_OUTPUTS}
    predictions = parse_response(response, count, top_k)
    return [
        Purified(row, float(arrays["STABILITY"][i]), arrays["RT_IMAGE"][i], arrays["PURIFIED"][i])
        for i, row in enumerate(predictions)
    ]
