"""KServe v2 tensor encodings shared by server and clients: the BYTES length-prefix framing of raw contents
and the datatype table of numeric raw tensors (little-endian, as the protocol requires). One implementation,
bounds-checked, so that the client reads a server's answer as carefully as the server reads a request."""

from __future__ import annotations

import math
import struct

import numpy as np

DATATYPES = {
    "BOOL": np.dtype(bool),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


class TensorFormatError(ValueError):
    """Raw contents that do not hold what their datatype and shape declare; the message says how."""


def split_bytes_tensor(buffer: bytes, count: int) -> list[bytes]:
    """A raw BYTES tensor: `count` elements, each a 4-byte little-endian length then that many bytes."""
    items, offset = [], 0
    for i in range(count):
        if offset + 4 > len(buffer):
            raise TensorFormatError(f"BYTES tensor ends inside the length of element {i} (expected {count} elements)")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise TensorFormatError(f"BYTES element {i} claims {length} bytes, only {len(buffer) - offset} remain")
        items.append(bytes(buffer[offset : offset + length]))
        offset += length
    if offset != len(buffer):
        raise TensorFormatError(f"BYTES tensor has {len(buffer) - offset} bytes after its {count} elements")
    return items


def join_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def array_from_raw(buffer: bytes, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    if datatype not in DATATYPES:
        raise TensorFormatError(f"datatype {datatype!r} cannot be sent as a numeric raw tensor")
    dtype = DATATYPES[datatype]
    expected = math.prod(shape) * dtype.itemsize
    if len(buffer) != expected:
        raise TensorFormatError(f"{datatype} tensor of shape {list(shape)} needs {expected} bytes, got {len(buffer)}")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)
