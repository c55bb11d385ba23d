"""The served pipeline with its classifier's log-probabilities averaged with a second classifier's (v6's from
the repository's history, or any other checkpoint), paired with the served one on the same RT draws.
Usage: python ensemble.py SECOND_CLASSIFIER_STEM TEST_IMAGES"""

from __future__ import annotations

import sys

import torch
from common import paired_clean, report, served_pipeline, split
from torch import nn

from atop_models.checkpoint import load_model


class WeightedMean(nn.Module):
    """(1 - weight) x log p_first + weight x log p_second."""

    def __init__(self, first: nn.Module, second: nn.Module, weight: float) -> None:
        super().__init__()
        self.first, self.second, self.weight = first, second, weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.weight) * self.first(x).log_softmax(1) + self.weight * self.second(x).log_softmax(1)


def main() -> None:
    torch.set_num_threads(1)
    served, test = served_pipeline(), split("test", int(sys.argv[2]))
    second, _ = load_model(sys.argv[1], "classifier")
    second.eval()
    reference, _ = paired_clean(served.classifier, served, test)
    for name, weight in [("served", 0.0), ("second alone", 1.0), ("second at 1/2", 0.5), ("second at 1/3", 1 / 3)]:
        report(name, *paired_clean(WeightedMean(served.classifier, second, weight), served, test), reference)


if __name__ == "__main__":
    main()
