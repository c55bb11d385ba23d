"""What a request may ask to see besides the probabilities: the RT'd image and the purified image of the first
draw (graph outputs of models exported with them) and the stability over the draws (computed here).

Nothing extra is fetched from the graph unless a request in flight asked for images: while one is, every
execution of its model fetches them (the batcher mixes requests in one batch, and one structured row per image
carries every output through it); requests that did not ask take their probabilities and leave the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IMAGE_OUTPUTS = ("RT_IMAGE", "PURIFIED")  # FP32 [N,3,H,W] in [0,1]
STABILITY = "STABILITY"  # FP32 [N]


@dataclass(frozen=True)
class Answer:
    probabilities: np.ndarray  # [N, classes], averaged over the draws
    stability: np.ndarray  # [N]: the share of the draws whose top-1 is the averaged top-1
    images: dict[str, np.ndarray] = field(default_factory=dict)  # asked-for IMAGE_OUTPUTS, the first draw's


def row_type(probabilities: str, classes: int, images: tuple[str, ...], size: int) -> np.dtype:
    """One image's outputs as one structured row, so that the batcher can split a batch of them back."""
    return np.dtype([(probabilities, "<f4", (classes,)), *[(name, "<f4", (3, size, size)) for name in images]])


def answer(rows: np.ndarray, probabilities: str, draws: int, images: tuple[str, ...]) -> Answer:
    """A request's rows, draw-major ([draws * N], plain probabilities or structured rows) -> its Answer."""
    plain = rows[probabilities] if rows.dtype.names else rows
    per_draw = plain.reshape(draws, -1, plain.shape[-1])
    mean = per_draw.mean(0)
    stability = (per_draw.argmax(2) == mean.argmax(1)).mean(0).astype(np.float32)
    return Answer(mean, stability, {name: np.ascontiguousarray(rows[: len(mean)][name]) for name in images})
