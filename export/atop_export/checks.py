"""The exporter's own checks on a written model file; each failure raises ExportCheckError saying what failed.

- structure: onnx.checker (full check, with shape inference);
- parity: the shipped graph's core (purifier -> classifier), cut out at the RT tensors, against PyTorch
  with identical RT draws: max |probability difference| and top-1 agreement;
- dynamic batch: batches of 1, 7 and 64 run and give one probability row per image;
- RT: the shipped graph's own RT tensors: every run draws anew, every image its own mask, exactly the
  configured number of blocks masked, the noise at the configured scale;
- unpredictability: two sessions in this process and one in another process draw differently.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.utils
import torch

from atop_export.graphs import INPUT, OUTPUT, Core, InputKind, example_input, to_unit_nchw
from atop_export.onnx_build import RT_IMAGE_TENSOR, RT_MASK_TENSOR
from atop_models.pipeline import DefendedClassifier
from atop_models.rt import RTConfig
from atop_server.session import create_session


class ExportCheckError(RuntimeError):
    pass


def check_structure(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportCheckError(f"{path} fails onnx.checker: {error}") from error


def _extract(path: Path, inputs: list[str], outputs: list[str], workdir: Path, name: str) -> Path:
    target = workdir / name
    onnx.utils.extract_model(str(path), str(target), inputs, outputs, check_model=False)
    return target


def compare(
    path: Path, feeds: dict[str, np.ndarray], expected: np.ndarray, tolerance: float, providers: list[str]
) -> dict[str, Any]:
    """Run `path` on `feeds` and compare its first output with PyTorch's `expected`."""
    session = create_session(path, providers)
    got = session.run(None, feeds)[0]
    result = {
        "images": len(expected),
        "provider": session.get_providers()[0],
        "max_abs_diff": float(np.abs(got.astype(np.float64) - expected).max()),
        "tolerance": tolerance,
    }
    if expected.ndim == 2:  # probabilities
        result["top1_agreement"] = float((got.argmax(1) == expected.argmax(1)).mean())
    if result["max_abs_diff"] > tolerance:
        raise ExportCheckError(
            f"{path}: outputs differ from PyTorch by {result['max_abs_diff']:.3g} (> {tolerance}) "
            f"on {result['provider']}"
        )
    return result


def defended_parity(
    path: Path, pipeline: DefendedClassifier, images: torch.Tensor, tolerance: float, providers: list[str]
) -> dict[str, Any]:
    """The shipped graph's core, cut out at the RT tensors, against PyTorch with identical RT draws."""
    generator = torch.Generator().manual_seed(0)
    noise, mask = pipeline.rt.draw_noise(images, generator), pipeline.rt.draw_mask(images, generator)
    rt_image = pipeline.rt.apply(images, noise, mask)
    with torch.no_grad():
        expected = Core(pipeline).eval()(rt_image, mask)[0].numpy()
    with tempfile.TemporaryDirectory() as workdir:
        core = _extract(path, [RT_IMAGE_TENSOR, RT_MASK_TENSOR], [OUTPUT], Path(workdir), "core.onnx")
        feeds = {RT_IMAGE_TENSOR: rt_image.numpy(), RT_MASK_TENSOR: mask.numpy()}
        return compare(core, feeds, expected, tolerance, providers)


def dynamic_batch(path: Path, kind: InputKind, size: int, providers: list[str]) -> dict[str, Any]:
    session = create_session(path, providers)
    for batch in (1, 7, 64):
        probabilities = session.run([OUTPUT], {INPUT: example_input(kind, batch, size).numpy()})[0]
        if probabilities.shape[0] != batch or not np.allclose(probabilities.sum(1), 1.0, atol=1e-2):
            raise ExportCheckError(f"{path}: batch {batch} gave probabilities of shape {probabilities.shape}")
    return {"batch_sizes": [1, 7, 64]}


def _clipped_noise_std(sigma: float, levels: np.ndarray) -> float:
    """The std that N(0, sigma) noise has after RT's clip to [0,1], at these pixel levels (simulated)."""
    rng = np.random.default_rng(0)
    return float((np.clip(levels + sigma * rng.standard_normal(levels.shape), 0, 1) - levels).std())


def _structured(kind: InputKind, batch: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch whose channels and columns differ (so a wrong layout or scale shows), near mid-gray (so the
    noise clips almost symmetrically). Returns the graph's input and its [0,1] NCHW value."""
    levels = 0.4 + 0.1 * np.arange(3)[:, None, None] + np.linspace(-0.02, 0.02, size)[None, None, :]
    unit = np.broadcast_to(levels, (batch, 3, size, size)).astype(np.float32)
    if kind == "uint8":
        as_uint8 = np.round(unit * 255).astype(np.uint8)
        return np.ascontiguousarray(as_uint8.transpose(0, 2, 3, 1)), as_uint8.astype(np.float32) / 255
    return np.ascontiguousarray(unit), unit


def rt_statistics(path: Path, rt: RTConfig, kind: InputKind, size: int, providers: list[str]) -> dict[str, Any]:
    images, unit = _structured(kind, 256, size)
    with tempfile.TemporaryDirectory() as workdir:
        front = _extract(path, [INPUT], [RT_IMAGE_TENSOR, RT_MASK_TENSOR], Path(workdir), "front.onnx")
        session = create_session(front, providers)
        (rt_image, mask), (_, mask_again) = (session.run(None, {INPUT: images}) for _ in range(2))
    cell = size // rt.grid
    blocks = mask[:, 0, ::cell, ::cell]
    per_image = blocks.reshape(len(blocks), -1).sum(1)
    known = np.broadcast_to(mask, rt_image.shape) == 0
    residual = (rt_image - unit)[known]
    noise_std = float(residual.std())
    expected_std = _clipped_noise_std(rt.noise_sigma, unit) if rt.noise_sigma else 0.0
    stats = {
        "masked_blocks_per_image": sorted({int(n) for n in per_image}),
        "expected_masked_blocks": rt.masked_blocks,
        "masked_fraction": float(mask.mean()),
        "distinct_masks_in_batch": len({b.tobytes() for b in blocks}),
        "masks_changed_between_runs": float((mask != mask_again).reshape(len(mask), -1).any(1).mean()),
        "noise_std": noise_std,
        "expected_noise_std": expected_std,
    }
    block_aligned = np.array_equal(np.repeat(np.repeat(blocks, cell, 1), cell, 2), mask[:, 0])
    problems = [
        (stats["masked_blocks_per_image"] != [rt.masked_blocks], "masked blocks per image differ from the config"),
        (not block_aligned, "the mask is not made of whole grid blocks"),
        (not np.all(rt_image[np.broadcast_to(mask, rt_image.shape) == 1] == 0), "masked pixels are not zero"),
        (rt.masked_blocks and stats["distinct_masks_in_batch"] < 250, "images of one batch share masks"),
        (rt.masked_blocks and stats["masks_changed_between_runs"] < 0.99, "two runs drew the same masks"),
        (abs(noise_std - expected_std) > 0.01, f"noise std {noise_std:.4f} is not the configured {expected_std:.4f}"),
        (abs(float(residual.mean())) > 0.01, "known pixels are not the input plus zero-mean noise (layout, scale?)"),
    ]
    for failed, what in problems:
        if failed:
            raise ExportCheckError(f"{path}: RT check failed: {what} ({stats})")
    return stats


_OTHER_PROCESS = """
import hashlib, sys
import numpy as np
from atop_server.session import create_session
images = np.load(sys.argv[2])
print(hashlib.sha256(create_session(sys.argv[1]).run(None, {"IMAGE": images})[1].tobytes()).hexdigest())
"""


def unpredictability(path: Path, kind: InputKind, size: int) -> dict[str, Any]:
    """First draws of two sessions here and of one session in a fresh process must all differ."""
    images, _ = _structured(kind, 16, size)
    with tempfile.TemporaryDirectory() as workdir:
        front = _extract(path, [INPUT], [RT_IMAGE_TENSOR, RT_MASK_TENSOR], Path(workdir), "front.onnx")
        np.save(Path(workdir) / "images.npy", images)
        digests = [
            hashlib.sha256(create_session(front).run(None, {INPUT: images})[1].tobytes()).hexdigest() for _ in range(2)
        ]
        other = subprocess.run(
            [sys.executable, "-c", _OTHER_PROCESS, str(front), str(Path(workdir) / "images.npy")],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        digests.append(other.stdout.strip())
    if len(set(digests)) != 3:
        raise ExportCheckError(f"{path}: RT draws repeat across sessions or processes ({digests})")
    return {"sessions_compared": 2, "processes_compared": 2, "first_draw_sha256": digests}


def parity_images(kind: InputKind, batch: int, size: int) -> torch.Tensor:
    """A fixed batch in the [0,1] NCHW form PyTorch takes (after the same decoding the graph does)."""
    torch.manual_seed(0)
    return to_unit_nchw(example_input(kind, batch, size), kind)
