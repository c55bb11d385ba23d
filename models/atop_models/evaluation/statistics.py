"""The evaluation's statistics: accuracy of any image -> logits model (a classifier, or the randomized defended
pipeline) on held-out data, the Wilson interval of a proportion, the paired McNemar test, and the per-image worst
case over attacks."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

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


def wilson95(successes: int, n: int) -> list[float]:
    """95% Wilson score interval of a proportion (sound at 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return [0.0, 1.0]
    z, p = 1.959964, successes / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, center - half), min(1.0, center + half)]


def mcnemar_one_sided(more: int, fewer: int) -> float:
    """P(at least `more` of the `more + fewer` discordant pairs fall on one side | both sides equally likely)."""
    n = more + fewer
    return sum(math.comb(n, k) for k in range(more, n + 1)) / 2**n


def encode_mask(hits: Iterable[bool]) -> str:
    """Per-image results as results files keep them: one "1" (kept) or "0" per image, in the data's order."""
    return "".join("1" if hit else "0" for hit in hits)


def decode_mask(mask: str) -> list[bool]:
    """The per-image results an `encode_mask` string holds."""
    return [bit == "1" for bit in mask]


def survivors(rows: list[dict]) -> list[bool]:
    """Per image: robust under every one of `rows` (attacks on the same images, each with its robust_mask)."""
    return [all(kept) for kept in zip(*(decode_mask(r["robust_mask"]) for r in rows), strict=True)]


def worst_case(rows: list[dict]) -> list[dict[str, Any]]:
    """Per (defense, norm, epsilon) hit by two or more adaptive attacks: the images that survive every one.
    AutoAttack's rule: robust accuracy is a per-image minimum over attacks, not the best single attack's figure
    (against a randomized defense, different attacks break different images)."""
    groups = defaultdict(list)
    for r in rows:
        if r["adaptive"] and r.get("robust_mask"):
            groups[(r["defense"], r["norm"], r["epsilon"])].append(r)
    worst = []
    for (defense, norm, epsilon), members in groups.items():
        if len(members) < 2:
            continue
        n = members[0]["n"]
        survived = sum(survivors(members))
        worst.append(
            {
                "defense": defense,
                "attacks": [m["attack"] for m in members],
                "norm": norm,
                "epsilon": epsilon,
                "n": n,
                "robust_accuracy": survived / n,
                "ci95": wilson95(survived, n),
                "strongest_single": min(m["robust_accuracy"] for m in members),
            }
        )
    return worst
