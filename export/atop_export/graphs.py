"""The PyTorch modules that become ONNX graphs. All reuse the trainer's own modules (RT, pipeline,
purifier, classifier): what is exported is exactly what was trained and evaluated.

The defended model is exported in two parts joined into one graph (see onnx_build.compose):
  front: IMAGE -> (rt_image, rt_mask)   input decoding to [0,1] NCHW, then RT drawn with ONNX random ops
  core:  (rt_image, rt_mask) -> PROBABILITIES, PURIFIED   purifier, compositing, classifier, softmax
so that the exporter can check RT's statistics on the shipped graph's own intermediate tensors, and check
the core's parity against PyTorch with identical RT draws. RT_IMAGE and PURIFIED are graph outputs too, for
the requests that ask to see what the defense did; onnxruntime copies out only the outputs a run names.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from atop_models.pipeline import DefendedClassifier

InputKind = Literal["float", "uint8"]
INPUT = "IMAGE"
OUTPUT = "PROBABILITIES"
RT_OUTPUT = "RT_IMAGE"  # the randomly transformed image (FP32 [N,3,H,W] in [0,1])
PURIFIED = "PURIFIED"  # the purified image the classifier saw (FP32 [N,3,H,W] in [0,1])
RT_IMAGE = "rt_image"
RT_MASK = "rt_mask"


def to_unit_nchw(x: torch.Tensor, kind: InputKind) -> torch.Tensor:
    """float [N,3,H,W] in [0,1] as is; decoded uint8 [N,H,W,3] (what image decoders give) -> float [0,1] NCHW."""
    if kind == "uint8":
        return x.permute(0, 3, 1, 2).float() / 255.0
    return x


class Front(nn.Module):
    def __init__(self, pipeline: DefendedClassifier, kind: InputKind) -> None:
        super().__init__()
        self.rt, self.kind = pipeline.rt, kind

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rt(to_unit_nchw(image, self.kind))


class Core(nn.Module):
    def __init__(self, pipeline: DefendedClassifier) -> None:
        super().__init__()
        self.pipeline = pipeline

    def forward(self, rt_image: torch.Tensor, rt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        purified = self.pipeline.restore(rt_image, rt_mask)
        return torch.softmax(self.pipeline.classifier(purified).float(), dim=1), purified.float()


class ClassifierOnly(nn.Module):
    """The bare classifier (the undefended baseline): IMAGE -> PROBABILITIES."""

    def __init__(self, classifier: nn.Module, kind: InputKind) -> None:
        super().__init__()
        self.classifier, self.kind = classifier, kind

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(to_unit_nchw(image, self.kind)).float(), dim=1)


class PurifierOnly(nn.Module):
    """The purifier given an RT'd image and its mask: (rt_image, rt_mask) -> PURIFIED in [0,1] (debugging)."""

    def __init__(self, pipeline: DefendedClassifier) -> None:
        super().__init__()
        self.pipeline = pipeline

    def forward(self, rt_image: torch.Tensor, rt_mask: torch.Tensor) -> torch.Tensor:
        return self.pipeline.restore(rt_image, rt_mask)


def example_input(kind: InputKind, batch: int, size: int) -> torch.Tensor:
    if kind == "uint8":
        return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8)
    return torch.rand(batch, 3, size, size)
