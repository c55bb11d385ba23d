"""Accuracy of any image -> logits model (a classifier, or the randomized defended pipeline) on held-out data."""

from __future__ import annotations

import torch
from torch import nn

from atop_models.data import BatchLoader, ImageArrays, LoaderConfig


@torch.no_grad()
def accuracy(
    model: nn.Module, data: ImageArrays, device: torch.device, image_size: int, batch_size: int = 500
) -> float:
    config = LoaderConfig(batch_size=batch_size, image_size=image_size, shuffle=False, drop_last=False)
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in BatchLoader(data, config, device))
    return correct / len(data)
