"""Image decoding and KServe tensor encodings, on real encoded files."""

import io
import struct

import numpy as np
import pytest
from PIL import Image

from atop_proto.tensors import join_bytes_tensor
from atop_server.codec import array_from_raw, decode_image, split_bytes_tensor
from atop_server.errors import InvalidInput


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


RED = Image.new("RGB", (40, 30), (250, 10, 10))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_formats_decode_to_rgb_at_model_size(fmt):
    array = decode_image(encode(RED, fmt), 32, 0)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    assert array[..., 0].mean() > 200 and array[..., 1].mean() < 60


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb(mode):
    image = Image.new(mode, (32, 32))
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    assert decode_image(encode(image, fmt), 32, 0).shape == (32, 32, 3)


def test_gif_first_frame_and_exif_orientation():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(gif, 32, 0)[..., 0].mean() > 200  # red, the first frame

    tall = Image.new("RGB", (20, 40), (0, 0, 0))
    tall.paste((255, 255, 255), (0, 0, 20, 20))  # white top half
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees: the upright image has its white half at the bottom
    upright = decode_image(encode(tall, "JPEG", exif=exif.tobytes()), 32, 0)
    assert upright[24:].mean() > 200 and upright[:8].mean() < 50


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty"),
        (b"GIF89a" + b"\x00" * 5, "cannot be decoded|not in a known image format"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "cannot be decoded|not in a known image format"),
        (b"hello world", "not in a known image format"),
    ],
)
def test_undecodable_inputs_are_invalid(data, message):
    with pytest.raises(InvalidInput, match=message):
        decode_image(data, 32, 3)


def test_truncated_jpeg_is_invalid():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(InvalidInput, match="image 5"):
        decode_image(data[: len(data) // 2], 32, 5)


def test_decompression_bomb_is_refused():
    huge = encode(Image.new("1", (12_000, 12_000)), "PNG")  # a few kB that would decode to 144 M pixels
    assert len(huge) < 100_000
    with pytest.raises(InvalidInput, match="too large"):
        decode_image(huge, 32, 0)


def test_bytes_tensor_round_trip_and_errors():
    items = [b"abc", b"", b"\x00" * 7]
    assert split_bytes_tensor(join_bytes_tensor(items), 3) == items
    with pytest.raises(InvalidInput, match="inside the length"):
        split_bytes_tensor(b"\x01\x00", 1)
    with pytest.raises(InvalidInput, match="claims 100 bytes"):
        split_bytes_tensor(struct.pack("<I", 100) + b"x", 1)
    with pytest.raises(InvalidInput, match="after its 1 elements"):
        split_bytes_tensor(join_bytes_tensor([b"a", b"b"]), 1)


def test_raw_arrays_check_their_size():
    data = np.arange(6, dtype="<f4")
    assert array_from_raw(data.tobytes(), "FP32", (2, 3)).tolist() == data.reshape(2, 3).tolist()
    with pytest.raises(InvalidInput, match="needs 28 bytes, got 24"):
        array_from_raw(data.tobytes(), "FP32", (7,))
    with pytest.raises(InvalidInput, match="datatype 'BF17'"):
        array_from_raw(b"", "BF17", (0,))
