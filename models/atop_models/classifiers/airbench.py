"""A fast small CIFAR network in the style of airbench94 (Keller Jordan): the CPU default classifier.

2x2 patch 'whitening' stem, three conv groups (conv, max-pool, BN, GELU, conv, BN, GELU), global max pool,
a linear head with a fixed output scale. ~2 M parameters, ~0.24 GFLOP per 32 px image.
"""

from __future__ import annotations

import torch
from torch import nn

from atop_models.classifiers.normalize import Normalize
from atop_models.classifiers.registry import CLASSIFIERS


def _conv(cin: int, cout: int) -> nn.Conv2d:
    """3x3 convolution whose first `cin` filters start as the identity (an implicit residual, airbench)."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(cin, cout)])
    return conv


def _norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    """BatchNorm with a fixed scale of 1: only the bias is learned (airbench; a scale after a conv is redundant)."""
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=momentum)
    norm.weight.requires_grad_(False)
    return norm


class ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int, activation: type[nn.Module], bn_momentum: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(cin, cout),
            nn.MaxPool2d(2),
            _norm(cout, bn_momentum),
            activation(),
            _conv(cout, cout),
            _norm(cout, bn_momentum),
            activation(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class AirbenchNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (64, 256, 256),
        whiten_width: int = 24,  # = 2 x 12: each eigenvector of the 12-dim 2x2x3 patches, and its negative
        activation: type[nn.Module] = nn.GELU,
        bn_momentum: float = 0.4,  # airbench's fast-moving BN statistics, suited to short schedules
        head_scale: float = 1 / 9,  # airbench's fixed logit temperature
        flip_average: bool = False,  # in eval mode, average the logits of the image and its mirror (TTA)
    ) -> None:
        super().__init__()
        self.normalize = Normalize()
        # The stem sees 2x2 patches as whole vectors; init_whitening() sets it from data and it stays fixed
        # (only its bias is learned), as in airbench.
        self.whiten = nn.Conv2d(3, whiten_width, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.stem_act = activation()
        groups, cin = [], whiten_width
        for width in widths:
            groups.append(ConvGroup(cin, width, activation, bn_momentum))
            cin = width
        self.groups = nn.Sequential(*groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(cin, num_classes, bias=False)
        self.head_scale = head_scale
        self.flip_average = flip_average
        self.num_features = cin

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to the ZCA-like eigenbasis of 2x2 patches of `images` ([N,3,H,W] in [0,1]).

        Half the filters are the eigenvectors scaled by 1/sqrt(eigenvalue), half their negatives, so the
        GELU after it keeps both signs (airbench). Makes the first epochs far more productive.
        """
        x = self.normalize(images)
        patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
        patches = patches - patches.mean(0)
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        filters = (eigenvectors.T / (eigenvalues + eps).sqrt().unsqueeze(1)).view(12, 3, 2, 2).float()
        half = self.whiten.out_channels // 2
        if half > len(filters):
            raise ValueError(f"whiten_width may be at most 24 for init_whitening, got {2 * half}")
        filters = filters.flip(0)[:half]  # the largest-variance directions first
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.whiten(self.normalize(x)))
        return self.pool(self.groups(x)).flatten(1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features) * self.head_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.flip_average or self.training:
            return self.forward_head(self.forward_features(x))
        # airbench's test-time augmentation (level 1): the logits of the image and its mirror, averaged. Part
        # of the model, so the exported graph, the server and every attack see the same function. One pass
        # over the doubled batch (half the per-node overhead of two passes: +9% at batch 1 in onnxruntime),
        # split by a reshape: slicing the batch in two would pin its size in the dynamo ONNX export.
        both = self.forward_head(self.forward_features(torch.cat([x, x.flip(-1)])))
        return both.reshape(2, -1, both.shape[-1]).mean(0)


@CLASSIFIERS.register("airbench")
def airbench(**kwargs: object) -> AirbenchNet:
    return AirbenchNet(**kwargs)  # type: ignore[arg-type]
