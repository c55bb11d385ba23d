"""DeepFillv2 building blocks: gated convolutions and a batched contextual-attention layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GatedConv2d(nn.Module):
    """Gated convolution (Yu et al. 2019): features * sigmoid(gate), both from one convolution.

    With ``activation=None`` it is a plain convolution (the output layers, whose values go through tanh).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        activation: type[nn.Module] | None = nn.ELU,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        gated = activation is not None
        self.conv = nn.Conv2d(
            in_channels,
            out_channels * 2 if gated else out_channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size - 1) // 2,
            dilation=dilation,
        )
        self.activation = activation() if gated else None
        self.reset_parameters()

    # Std of the initial weights times sqrt(fan_in). PyTorch's default (~0.58) and even Kaiming's sqrt(2)
    # lose the input within the ~20 gated layers (each halves the signal through its sigmoid gate): at
    # init the generator's output then differs by 6e-8 between two unrelated images, and training first has
    # to rediscover the input. 2.4 keeps it (output std 0.12-0.16 at cnum 8-48, no tanh saturation; 2.8
    # saturates). The output layer (no gate) keeps unit gain.
    HIDDEN_GAIN = 2.4

    def reset_parameters(self) -> None:
        fan_in = self.conv.in_channels * self.conv.kernel_size[0] * self.conv.kernel_size[1]
        gain = self.HIDDEN_GAIN if self.activation is not None else 1.0
        nn.init.normal_(self.conv.weight, 0.0, gain / math.sqrt(fan_in))
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.activation is None:
            return x
        features, gate = x.split(self.out_channels, dim=1)
        return self.activation(features) * torch.sigmoid(gate)


class GatedUpConv2d(nn.Module):
    """Nearest 2x upsampling then a gated convolution (DeepFillv2's gated 'deconvolution')."""

    def __init__(self, in_channels: int, out_channels: int, activation: type[nn.Module] = nn.ELU) -> None:
        super().__init__()
        self.conv = GatedConv2d(in_channels, out_channels, 3, activation=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ContextualAttention(nn.Module):
    """Fill holes with a softmax-weighted mix of known background patches (DeepFill's contextual attention).

    Batched over the whole batch with unfold / bmm / fold, never a per-sample loop: a loop would be frozen to
    the example's batch size when exported to ONNX (docs/design.md section 5). Matching uses 3x3 patches at
    1/rate resolution; reconstruction pastes (2*rate)x(2*rate) raw patches at full feature resolution.
    DeepFill's optional 'fuse' smoothing of the score map is left out: at CIFAR scale the score map is
    4x4 patches and the smoothing has almost nothing to act on.
    """

    def __init__(self, rate: int = 2, softmax_scale: float = 10.0) -> None:
        super().__init__()
        if rate < 2 or rate % 2:
            raise ValueError(f"contextual attention rate must be an even number >= 2, got {rate}")
        self.rate = rate
        self.softmax_scale = softmax_scale

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: features [B,C,H,W] (H, W multiples of rate); mask: [B,1,h*s,w*s] holes = 1, any scale s."""
        _, _, height, width = x.shape
        r = self.rate
        if height % r or width % r:
            raise ValueError(f"feature size {height}x{width} is not divisible by the attention rate {r}")
        # Replicate padding: a border patch pasted into a hole must not bring the zeros of a zero padding.
        padded = F.pad(x, (r // 2,) * 4, mode="replicate")
        raw = F.unfold(padded, kernel_size=2 * r, stride=r)  # [B, C*4r^2, L]
        small = x[:, :, ::r, ::r]  # nearest downsampling by r
        patches = F.unfold(small, kernel_size=3, padding=1)  # [B, C*9, L]
        normed = patches / patches.norm(dim=1, keepdim=True).clamp_min(1e-4)
        scores = torch.bmm(normed.transpose(1, 2), patches)  # [B, L background, L foreground]

        # A background patch may serve as a source only if none of its pixels is a hole.
        mask_small = F.adaptive_max_pool2d(mask, (height // r, width // r))
        holes = F.unfold(mask_small, kernel_size=3, padding=1).amax(dim=1, keepdim=True)  # [B, 1, L]
        valid = (1.0 - holes).transpose(1, 2)  # [B, L, 1]
        attention = torch.softmax(scores * self.softmax_scale - (1.0 - valid) * 1e4, dim=1) * valid

        fold = {"output_size": (height, width), "kernel_size": 2 * r, "stride": r, "padding": r // 2}
        out = F.fold(torch.bmm(raw, attention), **fold)  # [B, C, H, W]
        # Pasted patches overlap (4 deep inside, fewer at the border): average, do not sum.
        coverage = F.fold(torch.ones_like(raw[:1, : (2 * r) ** 2]), **fold)
        return out / coverage
