"""Shared fixtures: small real image folders (CIFAR-10 JPEGs from ../shared, and generated ones)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CIFAR_TAR = REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


def write_synthetic_imagefolder(root: Path, per_class: int, classes: int = 4, size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder of JPEGs whose classes differ in colour and stripe direction (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    palette = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230], [230, 210, 40], [200, 60, 200], [40, 200, 200]])
    for split, count in (("train", per_class), ("test", max(per_class // 4, 4))):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                ramp = np.linspace(0, 1, size)[None, :] if c % 2 else np.linspace(0, 1, size)[:, None]
                stripes = (np.sin(ramp * np.pi * (4 + c)) > 0).astype(np.float64)
                image = palette[c % len(palette)] * (0.55 + 0.45 * stripes[..., None])
                image = image + rng.normal(0, 25, (size, size, 3))
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def extract_cifar_slice(root: Path, per_class: dict[str, int]) -> Path:
    """The first N JPEGs of every class of each split of the shared CIFAR-10 archive, in ImageFolder layout."""
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 4 or parts[-3] not in per_class:
                continue
            split, label = parts[-3], parts[-2]
            if taken.get((split, label), 0) >= per_class[split]:
                continue
            taken[(split, label)] = taken.get((split, label), 0) + 1
            target = root / split / label / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    return root


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


TINY_PURIFIERS = {"deepfillv2": {"cnum": 8, "dilations": [2, 4]}, "unet": {"width": 8, "groups": 4}}


def make_tiny_checkpoints(
    folder: Path,
    size: int = 32,
    output: str = "full",
    classes: list[str] = CIFAR_CLASSES,
    purifier_arch: str = "deepfillv2",
) -> tuple[Path, Path]:
    """Small random-weight classifier and purifier checkpoints, as atop-train writes them."""
    import torch

    from atop_models.checkpoint import save_model
    from atop_models.classifiers import CLASSIFIERS
    from atop_models.purifiers import PURIFIERS
    from atop_models.rt import RTConfig

    torch.manual_seed(size)
    # head_scale 1: random weights then give confident, varied predictions, so parity compares real rankings.
    # flip_average: the shipped classifier's test-time mirror averaging, so every export and serving test
    # runs (and checks the dynamic batch of) the graph it makes.
    classifier_kwargs = {"num_classes": len(classes), "widths": [16, 32, 32], "head_scale": 1.0, "flip_average": True}
    classifier = CLASSIFIERS.create("airbench", **classifier_kwargs)
    classifier.init_whitening(torch.rand(64, 3, 32, 32))
    purifier_kwargs = TINY_PURIFIERS[purifier_arch]
    save_model(
        folder / "classifier", classifier, "classifier", "airbench", classifier_kwargs, classes=classes, image_size=size
    )
    save_model(
        folder / "purifier",
        PURIFIERS.create(purifier_arch, **purifier_kwargs),
        "purifier",
        purifier_arch,
        purifier_kwargs,
        image_size=size,
        classes=classes,
        rt=RTConfig().to_dict(),
        pipeline={"output": output, "draws": 1},
    )
    return folder / "classifier", folder / "purifier"


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository exported (with all of atop-export's checks) from small random-weight models."""
    from atop_export.cli import main as export

    folder = tmp_path_factory.mktemp("tiny_models")
    classifier, purifier = make_tiny_checkpoints(folder)
    repository = folder / "repository"
    export(
        [
            "--classifier",
            str(classifier),
            "--purifier",
            str(purifier),
            "--repository",
            str(repository),
            "--name",
            "tiny",
            "--parity-images",
            "4",
        ]
    )
    return repository


@pytest.fixture(scope="session")
def trained_classifier(synthetic_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of `atop-train classifier` on the generated 4-class set (4 epochs, a few seconds)."""
    from atop_models.train.cli import main as atop_train

    out = tmp_path_factory.mktemp("classifier")
    atop_train(
        [
            "classifier",
            "--out",
            str(out),
            "--data-source",
            str(synthetic_folder),
            "--data-cache-dir",
            str(out / "cache"),
            "--data-eval-images",
            "0",
            "--epochs",
            "4",
            "--lr",
            "0.4",
            "--batch-size",
            "32",
            "--arch-kwargs",
            '{"widths": [16, 32, 32]}',
        ]
    )
    return out


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_imagefolder(tmp_path_factory.mktemp("synthetic"), per_class=64)


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not CIFAR_TAR.exists():
        pytest.fail(f"{CIFAR_TAR} is missing: ../shared/datasets must sit beside the checkout")
    return extract_cifar_slice(tmp_path_factory.mktemp("cifar"), {"train": 20, "test": 10})


@pytest.fixture(scope="session")
def cifar_test_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 real CIFAR-10 test JPEGs (30 per class) under <root>/test/<class>/: the shipped models' floor tests."""
    if not CIFAR_TAR.exists():
        pytest.fail(f"{CIFAR_TAR} is missing: ../shared/datasets must sit beside the checkout")
    return extract_cifar_slice(tmp_path_factory.mktemp("cifar_test"), {"test": 30})


@pytest.fixture(scope="session")
def echo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository of deterministic classifiers whose every output row is known from its input."""
    from echo_model import write_echo_repository

    return write_echo_repository(tmp_path_factory.mktemp("echo_models"))
