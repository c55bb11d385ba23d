"""An opened image -> the RGB uint8 array a model sees, one way for the server, the clients and the trainer
(no train/serve skew): the first frame, EXIF orientation applied, any mode converted to RGB, resized bicubic."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def rgb_array(image: Image.Image, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3]. Decodes the image's data (the caller bounds what that may cost)."""
    image.seek(0)
    rgb = (ImageOps.exif_transpose(image) or image).convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8)
