"""SN-PatchGAN discriminator (DeepFillv2): stride-2 5x5 spectrally normalized convolutions, one score per patch.

Input is the image in [0,1] and the mask (4 channels), so the discriminator knows where the holes were.
``layers`` sets the depth: DeepFillv2 uses 6 at 256 px; at 32 px 4 layers leave a 2x2 map of patch scores.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from atop_models.registry import Registry

DISCRIMINATORS = Registry("discriminator")


class SNPatchGAN(nn.Module):
    def __init__(self, cnum: int = 64, layers: int = 6, negative_slope: float = 0.2) -> None:
        super().__init__()
        widths = [4] + [min(cnum * 2**i, cnum * 4) for i in range(layers)]
        blocks: list[nn.Module] = []
        for cin, cout in itertools.pairwise(widths):
            blocks += [
                spectral_norm(nn.Conv2d(cin, cout, 5, stride=2, padding=2)),
                nn.LeakyReLU(negative_slope),
            ]
        self.body = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: [B,3,H,W] in [0,1]; mask: [B,1,H,W]. Returns patch scores flattened to [B, P]."""
        return self.body(torch.cat([x * 2.0 - 1.0, mask], dim=1)).flatten(1)


@DISCRIMINATORS.register("sn_patchgan")
def sn_patchgan(**kwargs: object) -> SNPatchGAN:
    return SNPatchGAN(**kwargs)  # type: ignore[arg-type]


def hinge_d_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    return torch.relu(1.0 - real_scores).mean() + torch.relu(1.0 + fake_scores).mean()


def hinge_g_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """The generator's GAN loss. Its input must NOT be detached from the generator (upstream defect 1)."""
    return -fake_scores.mean()
