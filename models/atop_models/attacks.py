"""Gradient attacks with EOT (expectation over transformation) for randomized defenses.

EOT is a parameter of one shared gradient estimator, not a copied attack class: `EOTGradient(model, eot=K)`
averages the loss gradient over K independent forward passes (K fresh RT draws through the pipeline).
Attacks are small classes around one loop. They leave the model's train/eval mode alone: callers choose.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["linf", "l2"]


class EOTGradient:
    """d loss / d x, averaged over `eot` independent stochastic forward passes of `model`."""

    def __init__(
        self,
        model: nn.Module,
        eot: int = 1,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if eot < 1:
            raise ValueError(f"eot must be >= 1, got {eot}")
        self.model = model
        self.eot = eot
        self.loss = loss or (lambda logits, y: F.cross_entropy(logits, y, reduction="sum"))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grad = torch.zeros_like(x)
        for _ in range(self.eot):
            x_ = x.detach().requires_grad_(True)
            grad += torch.autograd.grad(self.loss(self.model(x_), y), x_)[0]
        return grad / self.eot


def _l2_normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (v.dim() - 1))


def project(delta: torch.Tensor, epsilon: float, norm: Norm) -> torch.Tensor:
    """Project a perturbation onto the epsilon ball of `norm`."""
    if norm == "linf":
        return delta.clamp(-epsilon, epsilon)
    scale = (epsilon / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
    return delta * scale.view(-1, *[1] * (delta.dim() - 1))


class PGD:
    """Projected gradient ascent on the loss within an l_inf or l_2 ball, staying inside [0,1]."""

    def __init__(
        self,
        gradient: EOTGradient,
        epsilon: float,
        step_size: float,
        steps: int,
        norm: Norm = "linf",
        random_start: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        self.gradient, self.epsilon, self.step_size, self.steps = gradient, epsilon, step_size, steps
        self.norm, self.random_start, self.generator = norm, random_start, generator

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if not self.random_start:
            return torch.zeros_like(x)
        if self.norm == "linf":
            u = torch.rand(x.shape, generator=self.generator).to(x.device)
            return (u * 2 - 1) * self.epsilon
        direction = _l2_normalize(torch.randn(x.shape, generator=self.generator).to(x.device))
        radius = torch.rand(x.shape[0], generator=self.generator).to(x.device) * self.epsilon
        return direction * radius.view(-1, *[1] * (x.dim() - 1))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        delta = (x + self._start(x)).clamp(0, 1) - x
        for _ in range(self.steps):
            grad = self.gradient(x + delta, y)
            step = grad.sign() if self.norm == "linf" else _l2_normalize(grad)
            delta = project(delta + self.step_size * step, self.epsilon, self.norm)
            delta = (x + delta).clamp(0, 1) - x
        return (x + delta).detach()


class FGSM(PGD):
    """One full-epsilon signed-gradient step from the clean image (Goodfellow et al. 2015)."""

    def __init__(self, gradient: EOTGradient, epsilon: float, norm: Norm = "linf") -> None:
        super().__init__(gradient, epsilon, step_size=epsilon, steps=1, norm=norm, random_start=False)


class NoisyFGSM:
    """N-FGSM (de Jorge et al. 2022): one signed-gradient step of size epsilon from a start drawn uniformly in
    an l_inf ball of radius `noise` (2 epsilon), not projected back to the epsilon ball. Single-step
    adversarial training with it does not collapse ("catastrophic overfitting") at 8/255 as FGSM-RS can,
    at the cost of one gradient per image: a training attack, not an evaluation one."""

    def __init__(
        self,
        gradient: EOTGradient,
        epsilon: float,
        noise: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.gradient, self.epsilon = gradient, epsilon
        self.noise = 2 * epsilon if noise is None else noise
        self.generator = generator

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        u = torch.rand(x.shape, generator=self.generator).to(x.device)
        start = (x + (u * 2 - 1) * self.noise).clamp(0, 1)
        return (start + self.epsilon * self.gradient(start, y).sign()).clamp(0, 1).detach()
