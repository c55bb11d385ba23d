"""Bytes in, arrays out: image decoding and the KServe v2 tensor encodings (no grpc, no onnxruntime)."""

from __future__ import annotations

import contextlib
import io
import math
import struct
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from atop_server.errors import InvalidInput

# Pillow refuses images above this many pixels (a decompression bomb: a small file that decodes to GBs).
MAX_IMAGE_PIXELS = 50_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

# KServe v2 datatype -> numpy dtype (little-endian, as the protocol requires).
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


@contextlib.contextmanager
def _opened(data: bytes, index: int) -> Iterator[Image.Image]:
    """The image with only its header read; any failure of opening or of the body's decoding becomes
    InvalidInput naming the image."""
    if not data:
        raise InvalidInput(f"image {index} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:  # Pillow only warns below twice its limit
                raise InvalidInput(
                    f"image {index} is too large to decode ({image.width}x{image.height} pixels, "
                    f"limit {MAX_IMAGE_PIXELS})"
                )
            yield image
    except Image.DecompressionBombError as error:
        raise InvalidInput(f"image {index} is too large to decode (limit {MAX_IMAGE_PIXELS} pixels): {error}") from None
    except UnidentifiedImageError:
        raise InvalidInput(
            f"image {index} ({len(data)} bytes) is not in a known image format (JPEG, PNG, WebP, BMP, GIF, ...)"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise InvalidInput(f"image {index} cannot be decoded as an image ({len(data)} bytes): {error}") from None


def image_pixels(data: bytes, index: int) -> int:
    """Width x height from the header alone: what decoding the image will cost, known before paying it."""
    with _opened(data, index) as image:
        return image.width * image.height


def decode_image(data: bytes, size: int, index: int) -> np.ndarray:
    """An encoded image (any format and mode Pillow reads; first frame; EXIF orientation applied) ->
    RGB uint8 [size, size, 3]."""
    with _opened(data, index) as image:
        image.seek(0)
        upright = ImageOps.exif_transpose(image) or image
        rgb = upright.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.uint8)


def split_bytes_tensor(buffer: bytes, count: int) -> list[bytes]:
    """A raw BYTES tensor: `count` elements, each a 4-byte little-endian length then that many bytes."""
    items, offset = [], 0
    for i in range(count):
        if offset + 4 > len(buffer):
            raise InvalidInput(f"BYTES tensor ends inside the length of element {i} (expected {count} elements)")
        (length,) = struct.unpack_from("<I", buffer, offset)
        offset += 4
        if offset + length > len(buffer):
            raise InvalidInput(f"BYTES element {i} claims {length} bytes, only {len(buffer) - offset} remain")
        items.append(bytes(buffer[offset : offset + length]))
        offset += length
    if offset != len(buffer):
        raise InvalidInput(f"BYTES tensor has {len(buffer) - offset} bytes after its {count} elements")
    return items


def join_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def array_from_raw(buffer: bytes, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    if datatype not in DATATYPES:
        raise InvalidInput(f"datatype {datatype!r} cannot be sent as a numeric raw tensor")
    dtype = DATATYPES[datatype]
    expected = math.prod(shape) * dtype.itemsize
    if len(buffer) != expected:
        raise InvalidInput(f"{datatype} tensor of shape {list(shape)} needs {expected} bytes, got {len(buffer)}")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)
