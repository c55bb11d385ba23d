"""A robust classifier and an accurate one served as one, mixed in probability (after Bai et al.'s mixed
classifiers, MixedNUTS, TMLR 2024): the output is log((1 - weight) softmax(accurate) + weight softmax(sharpness
robust)), log-probabilities that softmax, argmax and cross-entropy treat as logits.

Why it can keep the robust member's robustness: whatever an attacker does to the accurate member moves at most
`1 - weight` of the probability, so an image stays right wherever the robust member, sharpened, puts more than
that on the right class; on clean images the accurate member decides where the robust one is unsure. An attack
on the mixture sees this output, so robustness figures measured on it are adaptive (docs/design.md section 4).
`python -m atop_models.checkpoint mixture OUT ROBUST ACCURATE --weight W` makes one of two trained classifiers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from atop_models.classifiers.ensemble import Members
from atop_models.classifiers.registry import CLASSIFIERS


class Mixture(Members):
    def __init__(self, members: list[dict], weight: float, sharpness: float = 1.0, num_classes: int = 10) -> None:
        """members: [robust, accurate], each {"arch", "arch_kwargs"} as its checkpoint records them; weight: the
        robust member's share of the probability, in (0, 1); sharpness: its logits' scale (> 0; above 1 makes it
        surer, so that it outvotes the accurate member on more images, clean and attacked alike)."""
        if len(members) != 2:
            raise ValueError(f"a mixture has two members (robust, accurate), got {len(members)}")
        if not 0 < weight < 1 or sharpness <= 0:
            raise ValueError(f"weight must be in (0, 1) and sharpness > 0, got {weight} and {sharpness}")
        super().__init__(members, num_classes)
        self.weight, self.sharpness = weight, sharpness

    @property
    def robust(self) -> nn.Module:
        return self.members[0]

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        robust, accurate = logits
        return mix_log_probabilities(robust, accurate, self.weight, self.sharpness)


def mix_log_probabilities(
    robust: torch.Tensor, accurate: torch.Tensor, weight: float, sharpness: float = 1.0
) -> torch.Tensor:
    """log((1 - weight) softmax(accurate) + weight softmax(sharpness robust)) of two members' logits, weight in
    (0, 1). In log space (logsumexp of log-weighted log-softmaxes): no log(0) when one member is certain."""
    parts = torch.stack(
        [
            torch.log_softmax(sharpness * robust, 1) + math.log(weight),
            torch.log_softmax(accurate, 1) + math.log1p(-weight),
        ]
    )
    return torch.logsumexp(parts, 0)


@CLASSIFIERS.register("mixture")
def mixture(**kwargs: object) -> nn.Module:
    return Mixture(**kwargs)  # type: ignore[arg-type]
