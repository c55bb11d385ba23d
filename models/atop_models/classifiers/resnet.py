"""CIFAR ResNet-18 (He et al. 2016, with the 3x3 stem and no initial max-pool used for 32 px inputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atop_models.classifiers.normalize import Normalize
from atop_models.classifiers.registry import CLASSIFIERS


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        norm: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), norm(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, (count, width) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(count):
                stages.append(BasicBlock(cin, width, 2 if (j == 0 and i > 0) else 1, norm))
                cin = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, num_classes)
        self.num_features = cin

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(self.normalize(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@CLASSIFIERS.register("resnet18")
def resnet18(**kwargs: object) -> CifarResNet:
    return CifarResNet(**kwargs)  # type: ignore[arg-type]
