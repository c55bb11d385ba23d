"""The attacks atop-eval runs, by name, with optional overrides: "pgd-eot", "pgd-eot:steps=400:eot=40".

pgd-eot          PGD with EOT over RT draws through the whole defense (exact gradients; ours)
apgd-ce/-dlr     APGD with EOT (torchattacks' implementation of AutoAttack's APGD loop, on every image)
autoattack-rand  AutoAttack's version for randomized defenses: APGD-CE and APGD-DLR, the worse of the two kept
fgsm             one signed-gradient step (EOT-averaged gradient) through the whole defense
pgd-eot-robust   for a mixture classifier: PGD-EOT through the whole defense with only the mixture's robust
                 member in the classifier's place, then evaluated on the whole: the attack a mixture invites
                 (its accurate member falls to anything; the robust one is what holds the answer)
transfer-pgd     PGD on the bare classifier, then evaluated on the defense: NON-ADAPTIVE (upstream's protocol)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torchattacks
from torch import nn

from atop_models.attacks import FGSM, PGD, EOTGradient, Norm
from atop_models.classifiers.mixture import Mixture
from atop_models.pipeline import DefendedClassifier

ADAPTIVE = ("pgd-eot", "apgd-ce", "apgd-dlr", "autoattack-rand", "fgsm", "pgd-eot-robust")
NAMES = (*ADAPTIVE, "transfer-pgd")


@dataclass(frozen=True)
class AttackSpec:
    name: str
    steps: int
    eot: int
    step_size_factor: float = 2.5  # PGD step = factor * epsilon / steps (Madry et al.'s rule)

    @property
    def adaptive(self) -> bool:
        return self.name in ADAPTIVE

    @property
    def label(self) -> str:
        if self.name == "fgsm":
            return f"fgsm (EOT {self.eot})"
        if self.name == "transfer-pgd":
            return f"transfer-pgd ({self.steps} steps on the bare classifier; non-adaptive)"
        return f"{self.name} ({self.steps} steps, EOT {self.eot})"


def parse(text: str, pgd_steps: int, apgd_steps: int, eot: int) -> AttackSpec:
    name, *overrides = text.split(":")
    if name not in NAMES:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(NAMES)}")
    steps = apgd_steps if name.startswith(("apgd", "autoattack")) else pgd_steps
    spec = AttackSpec(name, 1 if name == "fgsm" else steps, eot)
    for override in overrides:
        key, _, value = override.partition("=")
        if key not in ("steps", "eot", "step_size_factor"):
            raise ValueError(f"attack override {override!r}: only steps=, eot=, step_size_factor=")
        spec = replace(spec, **{key: type(getattr(spec, key))(value)})
    return spec


def _apgd(
    model: nn.Module, loss: str, norm: Norm, epsilon: float, steps: int, eot: int, seed: int
) -> torchattacks.APGD:
    return torchattacks.APGD(
        model,
        norm="Linf" if norm == "linf" else "L2",
        eps=epsilon,
        steps=steps,
        n_restarts=1,
        seed=seed,
        loss=loss,
        eot_iter=eot,
        rho=0.75,
    )


def _apgd_candidates(
    defense: nn.Module,
    losses: tuple[str, ...],
    x: torch.Tensor,
    y: torch.Tensor,
    norm: Norm,
    epsilon: float,
    steps: int,
    eot: int,
    seed: int,
) -> list[torch.Tensor]:
    """APGD's highest-loss point and its last fooling point, per loss, for EVERY image.

    Not torchattacks' `perturb`: against a randomized defense it skips the images that one RT draw of the
    clean input got wrong (returning them unattacked, to be scored on a fresh draw) and keeps a point that
    fooled one draw; both overstate robustness. `attack_single_run` is its loop without that wrapper."""
    candidates = []
    for loss in losses:
        torch.manual_seed(seed)  # the random start, as perturb() seeds it
        x_best, _, _, x_best_adv = _apgd(defense, loss, norm, epsilon, steps, eot, seed).attack_single_run(x, y)
        candidates += [x_best.detach(), x_best_adv.detach()]
    return candidates


@torch.no_grad()
def least_correct(defense: nn.Module, candidates: list[torch.Tensor], y: torch.Tensor, draws: int) -> torch.Tensor:
    """Per image, the candidate the defense gets right least often over `draws` fresh RT draws; ties go to
    the lower mean true-class probability (scaled below one draw's step of 1/draws, so it only breaks ties).
    A randomized defense is judged on its expected behaviour, not on the one draw an attack happened to see."""
    scores = []
    for candidate in candidates:
        probabilities = torch.stack([defense(candidate).softmax(1) for _ in range(draws)])  # [draws, B, classes]
        correct = (probabilities.argmax(2) == y).float().mean(0)
        true_class = probabilities.mean(0).gather(1, y[:, None]).squeeze(1)
        scores.append(correct + true_class / (draws + 1))
    pick = torch.stack(scores).argmin(0)
    return torch.stack(candidates)[pick, torch.arange(len(y))]


def _robust_member_in_place(defense: nn.Module, classifier: nn.Module) -> nn.Module:
    """The defense with the mixture classifier's robust member as its classifier (the same RT and purifier)."""
    if not isinstance(classifier, Mixture):
        raise ValueError(f"pgd-eot-robust attacks a mixture classifier, not a {type(classifier).__name__}")
    if isinstance(defense, DefendedClassifier):
        return DefendedClassifier(defense.rt, defense.purifier, classifier.robust, defense.config)
    return classifier.robust  # the undefended mixture


def run(
    spec: AttackSpec,
    defense: nn.Module,
    classifier: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: Norm,
    epsilon: float,
    randomized: bool,
    seed: int,
) -> torch.Tensor:
    """Adversarial examples for (x, y). EOT is used only against a randomized defense (1 draw is exact else)."""
    eot = spec.eot if randomized else 1
    step = spec.step_size_factor * epsilon / max(spec.steps, 1)
    if spec.name == "pgd-eot":
        return PGD(EOTGradient(defense, eot), epsilon, step, spec.steps, norm)(x, y)
    if spec.name == "fgsm":
        return FGSM(EOTGradient(defense, eot), epsilon, norm)(x, y)
    if spec.name == "pgd-eot-robust":
        return PGD(EOTGradient(_robust_member_in_place(defense, classifier), eot), epsilon, step, spec.steps, norm)(
            x, y
        )
    if spec.name == "transfer-pgd":
        return PGD(EOTGradient(classifier, 1), epsilon, step, spec.steps, norm)(x, y)
    losses = (spec.name[5:],) if spec.name in ("apgd-ce", "apgd-dlr") else ("ce", "dlr")  # autoattack-rand
    candidates = _apgd_candidates(defense, losses, x, y, norm, epsilon, spec.steps, eot, seed)
    return least_correct(defense, candidates, y, eot)
