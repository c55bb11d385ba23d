"""Throughput against image size for make bench: the small random-weight architecture of the test fixtures
(tests/conftest.py make_tiny_checkpoints), exported by atop-export at 32 and at 256 px, in-process.

No 256 px model is shipped; this one shares its layers' widths with the 32 px one, so the ratio of the two
says what the pixel count costs the pipeline (the purifier grows with the pixels, the classifier pools)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from inprocess import run_batches

from atop_server.repository import load_model

TESTS = Path(__file__).resolve().parents[1]


def _export(folder: Path, size: int) -> Path:
    """The repository holding tiny_<size>px, exported once into `folder` and reused by later runs."""
    repository = folder / "repository"
    if (repository / f"tiny_{size}px").exists():
        return repository
    sys.path.insert(0, str(TESTS))  # conftest's fixture builders (they need torch: `make install`)
    from conftest import make_tiny_checkpoints

    from atop_export.cli import main as export

    classifier, purifier = make_tiny_checkpoints(folder / f"checkpoints{size}", size)
    arguments = ["--classifier", str(classifier), "--purifier", str(purifier), "--repository", str(repository)]
    export([*arguments, "--name", f"tiny_{size}px", "--inputs", "float", "--parity-images", "2"])
    return repository


def image_size_sweeps(folder: Path, sizes: Sequence[int], batches: Sequence[int], seconds: float) -> dict:
    """{"sweeps": {"<size> px": {batch: summary}}}, or {"skipped": why} when the export cannot run."""
    if not sizes:
        return {"skipped": "image sizes not measured (--no-image-sizes)"}
    sweeps: dict[str, dict] = {}
    for size in sizes:
        try:
            repository = _export(folder, size)
        except ImportError as error:  # the serving-only install has no torch
            return {"skipped": f"no exporter here ({error}): `make install` first"}
        loaded = load_model(repository, f"tiny_{size}px")
        images = np.random.default_rng(size).random((max(batches), 3, size, size), dtype=np.float32)
        sweeps[f"{size} px"] = {b: run_batches(loaded.session, images, b, seconds).summary() for b in batches}
    return {
        "sweeps": sweeps,
        "model": "tests/conftest.py make_tiny_checkpoints (airbench widths 16-32-32, "
        "DeepFillv2 cnum 8), random weights",
    }
