"""Bytes in, arrays out: image decoding, and the KServe v2 tensor encodings of atop_proto.tensors with their
errors as InvalidInput (no grpc, no onnxruntime)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from atop_proto import tensors
from atop_proto.images import rgb_array
from atop_server.errors import InvalidInput

# Pillow refuses images above this many pixels (a decompression bomb: a small file that decodes to GBs).
MAX_IMAGE_PIXELS = 50_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


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
        return rgb_array(image, size, size)


@contextlib.contextmanager
def _tensor_errors_are_invalid_input() -> Iterator[None]:
    try:
        yield
    except tensors.TensorFormatError as error:
        raise InvalidInput(str(error)) from None


def split_bytes_tensor(buffer: bytes, count: int) -> list[bytes]:
    """A raw BYTES tensor's `count` elements (atop_proto.tensors); malformed framing is InvalidInput."""
    with _tensor_errors_are_invalid_input():
        return tensors.split_bytes_tensor(buffer, count)


def array_from_raw(buffer: bytes, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A numeric raw tensor (atop_proto.tensors); a size or datatype that does not fit is InvalidInput."""
    with _tensor_errors_are_invalid_input():
        return tensors.array_from_raw(buffer, datatype, shape)
