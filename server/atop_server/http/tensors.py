"""Inference requests and responses of the REST API <-> the KServe gRPC messages.

A request body is JSON, or with Triton's binary-data extension a JSON header of Inference-Header-Content-Length
bytes followed by the binary tensors, in the order of the inputs that declare `binary_data_size`. JSON tensor
data is flat or nested row-major; BYTES elements (encoded images) are base64 strings, as JSON holds no raw bytes.
The binary form of a tensor is that of gRPC's raw contents, so it is passed on as is. Outputs are answered as
JSON, or as binary where an output asks for `binary_data` (or the request for `binary_data_output`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np

from atop_proto import grpc_service_pb2 as pb
from atop_proto.tensors import DATATYPES, join_bytes_tensor
from atop_server.codec import split_bytes_tensor
from atop_server.errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"
_INT64 = (-(2**63), 2**63 - 1)


def parse_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """(the JSON document, the binary data after it)."""
    if header_length is None:
        length = len(body)
    else:
        if not header_length.isascii() or not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInput(
                f"{HEADER_LENGTH} must be a byte count no larger than the body ({len(body)} bytes), "
                f"got {header_length!r}"
            )
        length = int(header_length)
    try:
        document = json.loads(body[:length])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInput(f"the request is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidInput("the request's JSON is nested too deeply") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"the request must be a JSON object, got {type(document).__name__}")
    return document, body[length:]


def _field(container: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    if key not in container:
        if default is None:
            raise InvalidInput(f"{where} lacks {key!r}")
        return default
    value = container[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidInput(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def _parameters(values: dict[str, Any], target: Any, where: str) -> None:
    """JSON parameters -> InferParameter map entries (bool, int64, double or string)."""
    for name, value in values.items():
        parameter = target[name]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int) and _INT64[0] <= value <= _INT64[1]:
            parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        elif isinstance(value, str):
            parameter.string_param = value
        else:
            raise InvalidInput(f"{where}: parameter {name!r} must be a boolean, a 64-bit integer, a number or a string")


def _json_data(data: Any, datatype: str, shape: list[int], where: str) -> tuple[list[bytes] | None, bytes | None]:
    """JSON tensor data -> (BYTES elements, or raw little-endian numbers)."""
    try:
        array = np.array(data)
    except (ValueError, OverflowError) as error:
        raise InvalidInput(f"{where}: 'data' is not a rectangular array of one kind: {error}") from None
    if array.size != math.prod(shape):
        raise InvalidInput(f"{where}: shape {shape} needs {math.prod(shape)} values, 'data' holds {array.size}")
    if datatype == "BYTES":
        if array.size and array.dtype.kind != "U":
            raise InvalidInput(f"{where}: BYTES data must be base64 strings (encoded images)")
        try:
            return [base64.b64decode(item, validate=True) for item in array.ravel().tolist()], None
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{where}: BYTES data must be base64 strings (encoded images)") from None
    if array.size and array.dtype.kind not in "iuf":
        raise InvalidInput(f"{where}: {datatype} data must be numbers, got {array.dtype.kind!r} values")
    if datatype not in DATATYPES:
        raise InvalidInput(f"{where}: datatype {datatype!r} is not a KServe v2 datatype")
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if array.size and (not np.all(np.mod(array, 1) == 0) or array.min() < info.min or array.max() > info.max):
            raise InvalidInput(f"{where}: {datatype} data must be integers in [{info.min}, {info.max}]")
    return None, array.astype(dtype).tobytes()


def infer_request(document: dict[str, Any], binary: bytes, model: str, version: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=str(document.get("id", "")))
    _parameters(_field(document, "parameters", dict, "the request", {}), request.parameters, "the request")
    inputs = _field(document, "inputs", list, "the request")
    offset = 0
    for i, item in enumerate(inputs):
        where = f"input {i}"
        if not isinstance(item, dict):
            raise InvalidInput(f"{where} must be a JSON object")
        tensor = request.inputs.add(
            name=_field(item, "name", str, where), datatype=_field(item, "datatype", str, where)
        )
        shape = _field(item, "shape", list, where)
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape):
            raise InvalidInput(f"{where}: 'shape' must be a list of non-negative integers, got {shape}")
        tensor.shape.extend(shape)
        parameters = _field(item, "parameters", dict, where, {})
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary) - offset:
                raise InvalidInput(f"{where}: binary_data_size {size!r} exceeds the {len(binary) - offset} bytes left")
            request.raw_input_contents.append(binary[offset : offset + size])
            offset += size
        else:
            if "data" not in item:
                raise InvalidInput(f"{where} has neither 'data' nor parameters.binary_data_size")
            items, raw = _json_data(item["data"], tensor.datatype, shape, where)
            if items is not None:
                request.raw_input_contents.append(join_bytes_tensor(items))
            else:
                request.raw_input_contents.append(raw)  # type: ignore[arg-type]
        _parameters({k: v for k, v in parameters.items() if k != "binary_data_size"}, tensor.parameters, where)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data follow the JSON that no input claims")
    for i, item in enumerate(_field(document, "outputs", list, "the request", [])):
        if not isinstance(item, dict):
            raise InvalidInput(f"output {i} must be a JSON object")
        output = request.outputs.add(name=_field(item, "name", str, f"output {i}"))
        _parameters(_field(item, "parameters", dict, f"output {i}", {}), output.parameters, f"output {i}")
    return request


def _wants_binary(request: pb.ModelInferRequest, name: str) -> bool:
    default = (
        request.parameters["binary_data_output"].bool_param if "binary_data_output" in request.parameters else False
    )
    for output in request.outputs:
        if output.name == name and "binary_data" in output.parameters:
            return output.parameters["binary_data"].bool_param
    return default


def infer_response(request: pb.ModelInferRequest, response: pb.ModelInferResponse) -> tuple[bytes, bytes]:
    """(the JSON document, the binary outputs after it, b"" when all are JSON)."""
    outputs, binary = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if _wants_binary(request, tensor.name):
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        elif tensor.datatype == "BYTES":
            entry["data"] = [item.decode() for item in split_bytes_tensor(raw, math.prod(tensor.shape))]
        else:
            entry["data"] = np.frombuffer(raw, DATATYPES[tensor.datatype]).tolist()
        outputs.append(entry)
    document = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "outputs": outputs,
    }
    return json.dumps(document).encode(), b"".join(binary)
