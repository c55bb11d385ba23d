"""Purifiers: inpainting generators built by name (``PURIFIERS.create(name, **kwargs)``)."""

from atop_models.purifiers import deepfillv2 as _deepfillv2  # noqa: F401  (registers "deepfillv2")
from atop_models.purifiers import unet as _unet  # noqa: F401  (registers "unet")
from atop_models.purifiers.registry import PURIFIERS

__all__ = ["PURIFIERS"]
