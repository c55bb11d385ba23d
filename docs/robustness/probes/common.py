"""What the probes share: the data, the shipped pipeline, and one paired clean pass on fixed RT draws."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch

from atop_models.data import ImageArrays, load_split
from atop_models.defended import load_defended
from atop_models.pipeline import DefendedClassifier

# Run from the repository root, as the Makefile is: its data set (DATA), the trainer's default cache, the zoo.
SOURCE, CACHE = os.environ.get("DATA", "../shared/datasets/cifar10-jpg.tar.gz"), os.environ.get("CACHE", ".data")
ZOO = "models/zoo"


def split(name: str, count: int) -> ImageArrays:
    return load_split(SOURCE, name, 32, CACHE, count=count)


def served_pipeline() -> DefendedClassifier:
    return load_defended(f"{ZOO}/classifier", f"{ZOO}/purifier").pipeline.eval()


def batches(data: ImageArrays, size: int = 250) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Images in [0, 1] and their labels, in order."""
    for start in range(0, len(data.labels), size):
        yield data.images[start : start + size].float() / 255.0, data.labels[start : start + size]


def paired_clean(
    classify: Callable[[torch.Tensor], torch.Tensor], pipeline: DefendedClassifier, data: ImageArrays
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: right behind RT and `pipeline`'s purifier, and right on the clean image. RT's draws come from
    seed 0 every time, so two calls differ only in `classify` and compare image by image."""
    torch.manual_seed(0)
    behind, bare = [], []
    with torch.no_grad():
        for x, y in batches(data):
            behind.append(classify(pipeline.purify(x)).argmax(1) == y)
            bare.append(classify(x).argmax(1) == y)
    return torch.cat(behind), torch.cat(bare)


def report(name: str, behind: torch.Tensor, bare: torch.Tensor, reference: torch.Tensor) -> None:
    print(
        f"{name}: pipeline {behind.float().mean():.4f} bare {bare.float().mean():.4f} "
        f"only this {(behind & ~reference).sum().item()} only the reference {(reference & ~behind).sum().item()}",
        flush=True,
    )
