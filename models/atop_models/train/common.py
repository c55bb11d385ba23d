"""Config pieces shared by the training commands."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from atop_models.attacks import PGD, EOTGradient
from atop_models.data import DEFAULT_SOURCE, SOURCE_HELP, ImageArrays, load_split
from atop_models.evaluation.statistics import accuracy, robust_accuracy
from atop_models.train.adversarial import AdversarialConfig
from atop_models.train.options import help_field


@dataclass(frozen=True)
class DataConfig:
    source: str = help_field(DEFAULT_SOURCE, SOURCE_HELP)
    cache_dir: str = help_field(".data", "where archives are extracted and decoded arrays cached (git-ignored)")
    size: int = help_field(32, "pixels; images are decoded and kept in memory at this size")
    train_images: int = help_field(0, "0 = the whole train split; N = a class-balanced subset (quick runs, tests)")
    eval_images: int = help_field(1000, "test images evaluated after each epoch; 0 = the whole test split")

    def load(self) -> tuple[ImageArrays, ImageArrays]:
        train = load_split(self.source, "train", self.size, self.cache_dir, count=self.train_images)
        test = load_split(self.source, "test", self.size, self.cache_dir, count=self.eval_images)
        return train, test


def leak_check_field() -> Any:
    """The `--leak-check-images` option of every training command that can train on adversarial examples."""
    return help_field(
        256,
        "test images the training attack is run on after each epoch (adversarial runs): the run stops when it "
        "raises their accuracy (label leaking: the network reads the label from the perturbation); 0: off",
    )


def eval_epsilon_field() -> Any:
    """The `--eval-epsilon` option of every training command with a per-epoch robustness check: the check stays at
    the evaluation's threat model when the training attack's radius is another (a smaller one trades robust
    accuracy for clean, and the check has to show what it gave up at the radius users are attacked with)."""
    return help_field(8 / 255, "l_inf radius of the per-epoch robustness check on the [0,1] scale (threat model)")


def collapse_drop_field() -> Any:
    """The `--collapse-drop` option of every training command that trains a classifier."""
    return help_field(
        0.1,
        "stop the run when clean test accuracy falls more than this fraction below its best epoch's (and beyond "
        "the check set's noise): the run has diverged, and the previous epoch's checkpoint is kept (1: never)",
    )


def pgd_check(
    model: nn.Module,
    test: ImageArrays,
    device: torch.device,
    image_size: int,
    *,
    images: int,
    epsilon: float,
    steps: int,
    eot: int,
) -> dict[str, Any]:
    """The per-epoch robustness check: PGD-`steps` (l_inf `epsilon`, step 2.5 epsilon / steps, each gradient
    averaged over `eot` draws of a randomized model) on `images` class-balanced test images. A weak attack on
    few images: a trend to watch during training, not a published figure."""
    subset = test.subset(images)
    attack = PGD(EOTGradient(model, eot), epsilon, 2.5 * epsilon / steps, steps)
    return {
        f"robust_accuracy_pgd{steps}_eot{eot}": robust_accuracy(model, attack, subset, device, image_size),
        "robust_images": len(subset),
    }


def _three_standard_errors(p: float, q: float, images: int) -> float:
    """Three standard errors of the difference of two accuracies measured on `images` images each."""
    return 3 * math.sqrt((p * (1 - p) + q * (1 - q)) / max(images, 1))


def collapse(best: float, current: float, images: int, min_drop: float) -> str | None:
    """Why a run has diverged, or None: its clean test accuracy fell more than `min_drop` below its best epoch's,
    and further than three standard errors of the difference on `images` test images (so that a small check set's
    sampling noise never halts a healthy run). Adversarial training on airbench's aggressive schedule can blow up
    near its peak lr and does not recover (docs/design.md, "Training that diverges")."""
    drop = best - current
    noise = _three_standard_errors(best, current, images)
    if drop <= max(min_drop, noise):
        return None
    return (
        f"clean test accuracy fell to {current:.1%}, {drop:.1%} below its best epoch's {best:.1%} "
        f"(more than --collapse-drop {min_drop:.0%} and than 3 standard errors on {images} images, {noise:.1%})"
    )


def training_attack_check(
    model: nn.Module,
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    test: ImageArrays,
    device: torch.device,
    image_size: int,
    images: int,
) -> dict[str, Any]:
    """Accuracy on the training attack's own examples of `images` class-balanced test images, beside their clean
    accuracy. In healthy adversarial training the attack lowers it (the 13-epoch baseline: 47.6% against 76.2%)."""
    subset = test.subset(images)
    return {
        "training_attack_accuracy": robust_accuracy(model, attack, subset, device, image_size),
        "training_attack_clean_accuracy": accuracy(model, subset, device, image_size),
        "training_attack_images": len(subset),
    }


def label_leak(clean: float, attacked: float, images: int) -> str | None:
    """Why a run has stopped learning robustness, or None: its training attack *raises* the accuracy of `images`
    test images (`clean` -> `attacked`) beyond three standard errors. The network reads the label from the
    perturbation (a single-step attack's step follows the true label's gradient: "label leaking", the mark of
    catastrophic overfitting), so its training inputs no longer teach it about attacks (docs/design.md,
    "Training that diverges")."""
    noise = _three_standard_errors(clean, attacked, images)
    if attacked - clean <= noise:
        return None
    return (
        f"the training attack's examples score {attacked:.1%} against {clean:.1%} clean on {images} test images "
        f"(more than 3 standard errors, {noise:.1%}): the network reads the label from the perturbation"
    )


def halt_reason(best: float, clean: float, images: int, metrics: dict[str, Any], min_drop: float) -> str:
    """Why a run should stop after the epoch that logged `metrics` and scored `clean` on `images` test images
    ("" when it is healthy): its clean accuracy collapsed below the `best` epoch's, or (adversarial runs) its
    training attack leaks the label."""
    reasons = [collapse(best, clean, images, min_drop)]
    if "training_attack_accuracy" in metrics:
        reasons.append(
            label_leak(
                metrics["training_attack_clean_accuracy"],
                metrics["training_attack_accuracy"],
                metrics["training_attack_images"],
            )
        )
    return "; ".join(reason for reason in reasons if reason)


@dataclass
class DivergenceGuard:
    """The end-of-epoch check that stops a diverged run (docs/design.md, "Training that diverges"), shared by
    `atop-train classifier` and `atop-train pipeline`. `best` is the best clean accuracy of the epochs kept so
    far: part of the task's resumable state, so that a resumed run compares against the same reference."""

    collapse_drop: float
    leak_check_images: int
    best: float = 0.0

    def check(
        self,
        model: nn.Module,
        adv: AdversarialConfig,
        test: ImageArrays,
        device: torch.device,
        image_size: int,
        clean: float,
    ) -> dict[str, Any]:
        """The metrics the check adds to an epoch that scored `clean` on all of `test`: the training attack's
        (adversarial runs) and, when the run has diverged, the reason under "halted" (the caller then keeps
        the previous epoch's weights). A healthy epoch's accuracy becomes the reference when it is the best."""
        metrics: dict[str, Any] = {}
        if adv.active and self.leak_check_images:
            attack = adv.attack(model)
            metrics |= training_attack_check(model, attack, test, device, image_size, self.leak_check_images)
        reason = halt_reason(self.best, clean, len(test), metrics, self.collapse_drop)
        if reason:
            return metrics | {"halted": reason}
        self.best = max(self.best, clean)
        return metrics
