"""DeepFillv2-style generator: gated convolutions, a coarse stage and a refinement stage with contextual attention.

Input convention (as DeepFillv2): 5 channels = masked image in [-1,1] (holes 0), a ones channel, the mask.
The module's public interface works on [0,1] images: ``forward(x, mask) -> (coarse, refined)`` in [0,1],
so no caller ever has to remember the [-1,1] convention (docs/design.md section 2, fault 3).
Any input size divisible by 8 works (two stride-2 stages, then attention at rate 2).
"""

from __future__ import annotations

import torch
from torch import nn

from atop_models.purifiers.layers import ContextualAttention, GatedConv2d, GatedUpConv2d
from atop_models.purifiers.registry import PURIFIERS


def _encoder(cin: int, cnum: int, activation: type[nn.Module]) -> list[nn.Module]:
    """5x5 stem, then two stride-2 stages: [B,cin,H,W] -> [B,2*cnum,H/4,W/4]."""
    return [
        GatedConv2d(cin, cnum // 2, 5, activation=activation),
        GatedConv2d(cnum // 2, cnum, 3, stride=2, activation=activation),
        GatedConv2d(cnum, cnum, 3, activation=activation),
        GatedConv2d(cnum, 2 * cnum, 3, stride=2, activation=activation),
        GatedConv2d(2 * cnum, 2 * cnum, 3, activation=activation),
    ]


def _dilated(width: int, dilations: tuple[int, ...], activation: type[nn.Module]) -> list[nn.Module]:
    """The bottleneck's growing receptive field: one gated 3x3 convolution per dilation."""
    return [GatedConv2d(width, width, 3, dilation=d, activation=activation) for d in dilations]


def _decoder(cnum: int, activation: type[nn.Module]) -> nn.Sequential:
    """[B,2*cnum,H/4,W/4] -> [B,3,H,W] in [-1,1]."""
    return nn.Sequential(
        GatedConv2d(2 * cnum, 2 * cnum, 3, activation=activation),
        GatedUpConv2d(2 * cnum, cnum, activation=activation),
        GatedConv2d(cnum, cnum, 3, activation=activation),
        GatedUpConv2d(cnum, cnum // 2, activation=activation),
        GatedConv2d(cnum // 2, cnum // 4, 3, activation=activation),
        GatedConv2d(cnum // 4, 3, 3, activation=None),
        nn.Tanh(),
    )


class CoarseStage(nn.Module):
    def __init__(self, cnum: int, dilations: tuple[int, ...], activation: type[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(*_encoder(5, cnum, activation), *_dilated(2 * cnum, dilations, activation))
        self.decoder = _decoder(cnum, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.body(x))


class RefineStage(nn.Module):
    """Two branches on the coarse result: dilated convolutions, and contextual attention; then a decoder."""

    def __init__(
        self,
        cnum: int,
        dilations: tuple[int, ...],
        activation: type[nn.Module],
        attention: ContextualAttention,
    ) -> None:
        super().__init__()
        self.conv_branch = nn.Sequential(*_encoder(5, cnum, activation), *_dilated(2 * cnum, dilations, activation))
        # ReLU before attention as in DeepFillv2: the cosine matching works on non-negative features.
        self.attention_in = nn.Sequential(
            *_encoder(5, cnum, activation), GatedConv2d(2 * cnum, 2 * cnum, 3, activation=nn.ReLU)
        )
        self.attention = attention
        self.attention_out = nn.Sequential(
            GatedConv2d(2 * cnum, 2 * cnum, 3, activation=activation),
            GatedConv2d(2 * cnum, 2 * cnum, 3, activation=activation),
        )
        self.merge = GatedConv2d(4 * cnum, 2 * cnum, 3, activation=activation)
        self.decoder = _decoder(cnum, activation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        conv = self.conv_branch(x)
        attended = self.attention_out(self.attention(self.attention_in(x), mask))
        return self.decoder(self.merge(torch.cat([conv, attended], dim=1)))


class DeepFillv2Generator(nn.Module):
    def __init__(
        self,
        cnum: int = 48,
        dilations: tuple[int, ...] = (2, 4, 8, 16),
        attention_rate: int = 2,
        attention_softmax_scale: float = 10.0,
        activation: type[nn.Module] = nn.ELU,
    ) -> None:
        super().__init__()
        if cnum % 4:
            raise ValueError(f"cnum must be a multiple of 4, got {cnum}")
        self.size_multiple = 4 * attention_rate  # two stride-2 stages, then attention at `rate`
        attention = ContextualAttention(attention_rate, attention_softmax_scale)
        self.coarse = CoarseStage(cnum, tuple(dilations), activation)
        self.refine = RefineStage(cnum, tuple(dilations), activation, attention)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: RT'd image in [0,1] [B,3,H,W]; mask: [B,1,H,W], holes = 1. Returns (coarse, refined) in [0,1]."""
        height, width = x.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"purifier input {height}x{width} must be a multiple of {self.size_multiple}")
        known = (x * 2.0 - 1.0) * (1.0 - mask)
        ones = torch.ones_like(mask)
        coarse = self.coarse(torch.cat([known, ones, mask], dim=1))
        stitched = coarse * mask + known
        refined = self.refine(torch.cat([stitched, ones, mask], dim=1), mask)
        return (coarse + 1.0) / 2.0, (refined + 1.0) / 2.0


@PURIFIERS.register("deepfillv2")
def deepfillv2(**kwargs: object) -> DeepFillv2Generator:
    return DeepFillv2Generator(**kwargs)  # type: ignore[arg-type]
