"""Random transforms (RT): Gaussian noise, then random block masking.

RT destroys the fine structure of an adversarial perturbation before the purifier sees the image. It is
drawn afresh for every sample on every call: the defense is randomized (docs/design.md section 1), so nothing
here is ever shared across a batch. Pass an explicit ``torch.Generator`` to make a draw reproducible
(tests, parity checks); leave it out in production.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class RTConfig:
    noise_sigma: float = field(
        default=0.25,
        metadata={"help": "std of the Gaussian noise on the [0,1] pixel scale; 0 = no noise (RT1)"},
    )
    grid: int = field(default=8, metadata={"help": "the image is cut into grid x grid blocks (size must divide)"})
    mask_fraction: float = field(
        default=0.25,
        metadata={"help": "fraction of the blocks masked in every image (exactly, not on average)"},
    )

    def __post_init__(self) -> None:
        if self.noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0, got {self.noise_sigma}")
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if not 0.0 <= self.mask_fraction < 1.0:
            raise ValueError(f"mask_fraction must be in [0, 1), got {self.mask_fraction}")

    @property
    def masked_blocks(self) -> int:
        """How many of the grid*grid blocks are masked in every image."""
        return round(self.mask_fraction * self.grid * self.grid)

    def to_dict(self) -> dict:
        return asdict(self)


# The paper's named settings. RT1 (masking only) is kept to reproduce its ~0% robust accuracy: the noise matters.
RT_PRESETS: dict[str, RTConfig] = {
    "rt1": RTConfig(noise_sigma=0.0),
    "rt2": RTConfig(),
}


class RandomTransform(nn.Module):
    """x in [0,1], shape [B,C,H,W] -> (x_rt, mask).

    ``mask`` is [B,1,H,W] with 1 on the masked (hole) pixels; ``x_rt`` is the noisy image with the holes set
    to 0. Both are differentiable in x (the mask does not depend on x; the clip passes gradient where it is
    not active), so attacks through RT get exact gradients.
    """

    def __init__(self, config: RTConfig) -> None:
        super().__init__()
        self.config = config

    # Draws use *_like ops on tensors shaped from x when no generator is given, so that an ONNX export keeps
    # the batch dimension symbolic and becomes RandomNormalLike / RandomUniformLike + TopK + ScatterElements:
    # the same code draws RT in PyTorch and inside the exported graph.
    def draw_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.config.noise_sigma == 0:
            return torch.zeros_like(x)
        if generator is None:
            return torch.randn_like(x) * self.config.noise_sigma
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * self.config.noise_sigma

    def draw_mask(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample block mask: top-k of uniform scores per image gives exactly k masked blocks each."""
        height, width = x.shape[-2:]
        grid = self.config.grid
        if height % grid or width % grid:
            raise ValueError(f"image size {height}x{width} is not divisible by the RT grid {grid}")
        one_per_block = x[:, 0, :grid, :grid].flatten(1)  # [B, grid*grid]: only its shape is used
        if generator is None:
            scores = torch.rand_like(one_per_block)
        else:
            scores = torch.rand(one_per_block.shape, generator=generator, device=x.device, dtype=x.dtype)
        blocks = torch.zeros_like(one_per_block)
        if self.config.masked_blocks:
            blocks = blocks.scatter(1, scores.topk(self.config.masked_blocks, dim=1).indices, 1.0)
        # Each block value covers (height/grid) x (width/grid) pixels: expand, then fold into the image grid.
        sy, sx = height // grid, width // grid
        blocks = blocks.view(-1, 1, grid, 1, grid, 1).expand(-1, 1, grid, sy, grid, sx)
        return blocks.reshape(-1, 1, height, width)

    def apply(self, x: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """RT with given draws (used by parity checks that feed the same draws to another runtime)."""
        return (x + noise).clamp(0.0, 1.0) * (1.0 - mask)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        noise = self.draw_noise(x, generator)
        mask = self.draw_mask(x, generator)
        return self.apply(x, noise, mask), mask
