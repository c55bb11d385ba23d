"""Classifiers built by name (``CLASSIFIERS.create(name, num_classes=..., ...)``).

Every classifier takes images in [0,1] and owns its normalization (docs/design.md section 2, fault 3), and
splits into ``forward_features`` + ``forward_head`` (timm's convention).
"""

from atop_models.classifiers import airbench as _airbench  # noqa: F401  (registers "airbench")
from atop_models.classifiers import ensemble as _ensemble  # noqa: F401  (registers "ensemble")
from atop_models.classifiers import mixture as _mixture  # noqa: F401  (registers "mixture")
from atop_models.classifiers import resnet as _resnet  # noqa: F401  (registers "resnet18")
from atop_models.classifiers.registry import CLASSIFIERS

__all__ = ["CLASSIFIERS"]
