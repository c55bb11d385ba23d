"""Accuracy of any image -> logits model (a classifier, or the randomized defended pipeline) on held-out data."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from atop_models.data import BatchLoader, ImageArrays, LoaderConfig


@torch.no_grad()
def predictions(
    model: nn.Module, data: ImageArrays, device: torch.device, image_size: int, batch_size: int = 500
) -> torch.Tensor:
    """The top-1 class of every image of `data`, in order (one draw of a randomized model)."""
    config = LoaderConfig(batch_size=batch_size, image_size=image_size, shuffle=False, drop_last=False)
    return torch.cat([model(x).argmax(1).cpu() for x, _ in BatchLoader(data, config, device)])


def accuracy(
    model: nn.Module, data: ImageArrays, device: torch.device, image_size: int, batch_size: int = 500
) -> float:
    return float((predictions(model, data, device, image_size, batch_size) == data.labels).float().mean())


def robust_accuracy(
    model: nn.Module,
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data: ImageArrays,
    device: torch.device,
    image_size: int,
    batch_size: int = 64,
) -> float:
    """Fraction of `data` that `model` classifies correctly after `attack` (which sees `model` itself)."""
    config = LoaderConfig(batch_size=batch_size, image_size=image_size, shuffle=False, drop_last=False)
    correct = 0
    for x, y in BatchLoader(data, config, device):
        x_adv = attack(x, y)
        with torch.no_grad():
            correct += int((model(x_adv).argmax(1) == y).sum())
    return correct / len(data)
