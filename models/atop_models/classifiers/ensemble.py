"""Several trained classifiers served as one: the mean of their logits (each member with its own test-time
averaging). An attack on the ensemble sees that mean, so robustness figures measured on it are adaptive.
`python -m atop_models.checkpoint ensemble OUT MEMBER ...` makes one checkpoint of trained members.
"""

from __future__ import annotations

import torch
from torch import nn

from atop_models.classifiers.registry import CLASSIFIERS


class Members(nn.Module):
    """Trained classifiers run side by side; subclasses say how their logits become one answer (`combine`)."""

    def __init__(self, members: list[dict], num_classes: int = 10) -> None:
        """members: each member's {"arch", "arch_kwargs"}, as its checkpoint records them."""
        super().__init__()
        self.members = nn.ModuleList(
            CLASSIFIERS.create(m["arch"], **{**m["arch_kwargs"], "num_classes": num_classes}) for m in members
        )
        self.num_features = sum(m.num_features for m in self.members)

    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.forward_features(x) for m in self.members], 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        parts = features.split([m.num_features for m in self.members], 1)
        return self.combine([m.forward_head(f) for m, f in zip(self.members, parts, strict=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each member's own forward, so its test-time averaging (airbench's mirror) applies in eval mode.
        return self.combine([m(x) for m in self.members])


class Ensemble(Members):
    def combine(self, logits: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(logits).mean(0)


@CLASSIFIERS.register("ensemble")
def ensemble(**kwargs: object) -> Ensemble:
    return Ensemble(**kwargs)  # type: ignore[arg-type]
