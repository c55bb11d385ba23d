"""airbench94's second test-time augmentation level on the served classifier alone: the mirror-averaged logits
of the image (weight 1/2) and of it shifted `pad` pixels diagonally each way, reflect-padded (1/4 each).
Clean accuracy, and PGD-10 on the bare classifier (a training-style check, not a robustness claim).
Usage: python translate_tta.py TEST_IMAGES"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from common import ZOO, split
from torch import nn

from atop_models.checkpoint import load_model
from atop_models.evaluation.statistics import accuracy
from atop_models.train.common import pgd_check


class Translate(nn.Module):
    def __init__(self, net: nn.Module, pad: int) -> None:
        super().__init__()
        self.net, self.pad = net, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, (h, w) = self.pad, x.shape[-2:]
        padded = F.pad(x, (p,) * 4, mode="reflect")
        up_left, down_right = padded[..., :h, :w], padded[..., 2 * p :, 2 * p :]
        return 0.5 * self.net(x) + 0.25 * (self.net(up_left) + self.net(down_right))


def main() -> None:
    torch.set_num_threads(1)
    model, _ = load_model(f"{ZOO}/classifier", "classifier")
    model.eval()
    cpu, test = torch.device("cpu"), split("test", 10000)
    variants = [("mirror", model), ("mirror + 1 px", Translate(model, 1)), ("mirror + 2 px", Translate(model, 2))]
    for name, net in variants:
        print(name, "clean", accuracy(net, test.subset(int(sys.argv[1])), cpu, 32), flush=True)
        print(name, pgd_check(net, test, cpu, 32, images=256, epsilon=8 / 255, steps=10, eot=1), flush=True)


if __name__ == "__main__":
    main()
