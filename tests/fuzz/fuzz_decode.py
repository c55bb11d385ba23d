"""Coverage-guided fuzzing (atheris, libFuzzer) of what the server does with a client's bytes before any model
runs: a raw BYTES tensor split into elements, each element's size read from its header, then decoded.

The property: every input is either decoded to RGB uint8 [32, 32, 3] or refused with InvalidInput (which the
server answers INVALID_ARGUMENT, naming the image). Any other exception (MemoryError beyond a bounded address
space included) or a wrong shape is a finding: libFuzzer stops, writes the input to <artifact_prefix>crash-*, exits 1.

    python tests/fuzz/fuzz_decode.py CORPUS_DIR -max_total_time=600 -artifact_prefix=DIR/
The seed corpus (valid images in every format the server reads, and BYTES tensors of them) is written to
CORPUS_DIR first when it is empty. `make fuzz` runs it for 10 minutes; the suite runs it for a few seconds.
"""

from __future__ import annotations

import io
import resource
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["PIL", "atop_server", "atop_proto"]):
    import numpy as np
    from PIL import Image

    from atop_proto.tensors import join_bytes_tensor
    from atop_server.codec import decode_image, image_pixels, split_bytes_tensor
    from atop_server.errors import InvalidInput

SIZE = 32  # the shipped model's input size
# Address space for the whole fuzzing process (~250 MB of it is Python, Pillow and numpy): decoding one image
# within the server's pixel limit (50 MP) needs well under this; an input that needs more raises MemoryError,
# a finding. Not libFuzzer's -rss_limit_mb: it reads the peak RSS, which Linux carries over from the parent
# across fork and exec, so a run started from a big process (pytest after the model tests) failed at once.
ADDRESS_SPACE_BYTES = 3 * 1024**3


def seeds() -> dict[str, bytes]:
    """Small valid images in each format and mode the server accepts, alone and as BYTES tensors."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8))
    images: dict[str, bytes] = {}
    for fmt, mode in [("JPEG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"), ("GIF", "P"), ("BMP", "RGB"), ("WEBP", "RGB")]:
        buffer = io.BytesIO()
        rgb.convert(mode).save(buffer, fmt)
        images[f"{fmt.lower()}-{mode}"] = buffer.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated, so that exif_transpose runs
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", exif=exif)
    images["jpeg-exif"] = buffer.getvalue()
    tensors = {f"tensor-{name}": join_bytes_tensor([data, data]) for name, data in images.items()}
    return {**images, **tensors}


def check(data: bytes) -> None:
    """One element: decoded to the model's size, or InvalidInput; the header's size bounds the decoding."""
    try:
        pixels = image_pixels(data, 0)
        image = decode_image(data, SIZE, 0)
    except InvalidInput:
        return
    assert pixels > 0, f"a decodable image reported {pixels} pixels"
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8, (image.shape, image.dtype)


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    count = provider.ConsumeIntInRange(0, 3)
    rest = provider.ConsumeBytes(len(data))
    try:
        elements = split_bytes_tensor(rest, count) if count else [rest]
    except InvalidInput:
        elements = [rest]  # not a tensor: fuzz the bytes as one image
    for element in elements:
        check(element)


def main() -> None:
    corpus = next((Path(arg) for arg in sys.argv[1:] if not arg.startswith("-")), None)
    if corpus is not None and not any(corpus.glob("*")):
        corpus.mkdir(parents=True, exist_ok=True)
        for name, data in seeds().items():
            # The provider reads one byte of element count first: 2 for a tensor of two images, 0 for one image.
            (corpus / name).write_bytes(bytes([2 if name.startswith("tensor") else 0]) + data)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_BYTES, ADDRESS_SPACE_BYTES))
    atheris.Setup([*sys.argv, "-rss_limit_mb=0"], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
