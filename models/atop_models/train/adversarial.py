"""Adversarial training options shared by `atop-train classifier` and `atop-train pipeline`: which attack
makes the training inputs, how strong, and what share of each batch it replaces."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from atop_models.attacks import PGD, EOTGradient, NoisyFGSM
from atop_models.train.options import help_field

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AdversarialConfig:
    kind: Literal["none", "n-fgsm", "pgd"] = help_field(
        "none",
        "training inputs: clean; N-FGSM (one gradient per image, no catastrophic overfitting at 8/255); "
        "or PGD with --adv-steps",
    )
    epsilon: float = help_field(
        8 / 255, "l_inf radius of the training attack on the [0,1] scale (8/255: the threat model; less: more clean)"
    )
    steps: int = help_field(2, "PGD steps (pgd only)")
    step_size: float = help_field(5 / 255, "PGD step on the [0,1] scale (pgd only; 2.5 epsilon / steps)")
    eot: int = help_field(1, "random draws averaged per gradient (fresh RT draws; 1: each step sees a new one)")
    fraction: float = help_field(
        1.0, "share of each batch replaced by its adversarial version (the rest stays clean: trades robust for clean)"
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"adv fraction must be in [0, 1], got {self.fraction}")

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.fraction > 0

    def attack(self, model: nn.Module) -> Attack:
        gradient = EOTGradient(model, self.eot)
        if self.kind == "n-fgsm":
            return NoisyFGSM(gradient, self.epsilon)
        if self.kind == "pgd":
            return PGD(gradient, self.epsilon, self.step_size, self.steps)
        raise ValueError(f"no attack for kind {self.kind!r}")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch with its first `fraction` replaced by adversarial examples against `model`, which is put in
        eval mode for the attack (the function that is served: BN running statistics, test-time averaging)."""
        count = round(self.fraction * len(x))
        if not self.active or count == 0:
            return x
        was_training = model.training
        model.eval()
        x_adv = self.attack(model)(x[:count], y[:count])
        model.train(was_training)
        return torch.cat([x_adv, x[count:]])
