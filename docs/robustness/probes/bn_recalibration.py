"""Does recomputing the served classifier's BatchNorm statistics on what the pipeline shows it (RT + purifier)
win back the clean points the pipeline costs? Usage: python bn_recalibration.py CALIBRATION_IMAGES TEST_IMAGES"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch
from common import batches, paired_clean, report, served_pipeline, split
from torch import nn

from atop_models.pipeline import DefendedClassifier


def recalibrated(
    pipeline: DefendedClassifier, shown: Callable[[DefendedClassifier, torch.Tensor], torch.Tensor], images: int
) -> DefendedClassifier:
    """A copy whose classifier's BN statistics are the plain average over `images` training images as `shown`."""
    pipeline = copy.deepcopy(pipeline)
    norms = [m for m in pipeline.classifier.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average, not an EMA: every calibration image counts once
        norm.train()
    torch.manual_seed(123)
    with torch.no_grad():
        for x, _ in batches(split("train", images)):
            pipeline.classifier(shown(pipeline, x))
    for norm in norms:
        norm.eval()
    return pipeline


def main() -> None:
    torch.set_num_threads(1)
    calibration, test_images = int(sys.argv[1]), int(sys.argv[2])
    served, test = served_pipeline(), split("test", test_images)
    reference, _ = paired_clean(served.classifier, served, test)
    for name, pipeline in {
        "served": served,
        "BN statistics of the pipeline's output": recalibrated(served, lambda p, x: p.purify(x), calibration),
        "BN statistics of clean images": recalibrated(served, lambda p, x: x, calibration),
    }.items():
        report(name, *paired_clean(pipeline.classifier, pipeline, test), reference)


if __name__ == "__main__":
    main()
