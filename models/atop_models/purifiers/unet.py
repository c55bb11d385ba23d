"""A U-Net purifier for small images: three scales joined by skip connections, GroupNorm, GELU.

At 32 px DeepFillv2's bottleneck is 8 x 8, where its dilated convolutions see mostly padding and its two
stages blur what they pass on. Here the skip connections carry the visible pixels' detail straight to the
output, and the output is a correction added to the visible (noisy, holed) image, so an untrained net starts
as the identity on what is visible. Same interface as DeepFillv2: forward(x, mask) -> (coarse, refined) in
[0,1]; a one-stage net returns its output twice, so the trainers' two L1 terms weigh it double.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atop_models.purifiers.registry import PURIFIERS


def _block(cin: int, cout: int, groups: int) -> nn.Sequential:
    """Two 3x3 convolutions, each followed by GroupNorm (batch-independent, as a purifier must be) and GELU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(groups, cout),
        nn.GELU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(groups, cout),
        nn.GELU(),
    )


class UNetPurifier(nn.Module):
    def __init__(self, width: int = 32, groups: int = 8) -> None:
        super().__init__()
        if width % groups:
            raise ValueError(f"width must be a multiple of groups ({groups}), got {width}")
        self.size_multiple = 4  # two 2x downsamplings
        self.enc1 = _block(5, width, groups)
        self.enc2 = _block(width, 2 * width, groups)
        self.enc3 = _block(2 * width, 4 * width, groups)
        self.dec2 = _block(4 * width + 2 * width, 2 * width, groups)
        self.dec1 = _block(2 * width + width, width, groups)
        self.head = nn.Conv2d(width, 3, 1)
        nn.init.zeros_(self.head.weight)  # starts as the identity on the visible pixels
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: RT'd image in [0,1] [B,3,H,W]; mask: [B,1,H,W], holes = 1. Returns (out, out) in [0,1]."""
        height, width = x.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"purifier input {height}x{width} must be a multiple of {self.size_multiple}")
        known = (x * 2.0 - 1.0) * (1.0 - mask)
        e1 = self.enc1(torch.cat([known, torch.ones_like(mask), mask], dim=1))
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0, mode="nearest"), e2], dim=1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], dim=1))
        out = (known + self.head(d1)).clamp(-1.0, 1.0)
        out = (out + 1.0) / 2.0
        return out, out


@PURIFIERS.register("unet")
def unet(**kwargs: object) -> UNetPurifier:
    return UNetPurifier(**kwargs)  # type: ignore[arg-type]
