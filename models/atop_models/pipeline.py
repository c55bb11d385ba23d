"""The defended classifier: RT -> purifier -> (composite or full output) -> classifier, differentiable end to end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from atop_models.rt import RandomTransform

PurifierOutput = Literal["full", "composite"]


@dataclass(frozen=True)
class PipelineConfig:
    # "full": the classifier sees the refinement output everywhere, so the purifier also removes the RT noise
    # on known pixels. "composite": x_rt * (1-m) + G * m, DeepFill's inpainting convention; it hands the RT
    # noise straight to the classifier. Chosen by measurement (docs/design.md section 2); "full" is the default.
    output: PurifierOutput = "full"
    draws: int = 1  # RT draws averaged (in probability) per image; 1 = a single randomized pass

    def __post_init__(self) -> None:
        if self.output not in ("full", "composite"):
            raise ValueError(f"output must be 'full' or 'composite', got {self.output!r}")
        if self.draws < 1:
            raise ValueError(f"draws must be >= 1, got {self.draws}")


def compose(x_rt: torch.Tensor, mask: torch.Tensor, refined: torch.Tensor, output: PurifierOutput) -> torch.Tensor:
    """What the classifier sees: the refined image, or its holes pasted into the RT'd image."""
    if output == "composite":
        return x_rt * (1.0 - mask) + refined * mask
    return refined


class DefendedClassifier(nn.Module):
    """x in [0,1] -> logits. With draws=K > 1 the output is log(mean_k softmax(logits_k)), so that softmax,
    argmax and cross-entropy all treat it as logits of the averaged probabilities.
    """

    def __init__(
        self,
        rt: RandomTransform,
        purifier: nn.Module | None,
        classifier: nn.Module,
        config: PipelineConfig = PipelineConfig(),
    ) -> None:
        super().__init__()
        self.rt = rt
        self.purifier = purifier
        self.classifier = classifier
        self.config = config

    def purify(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One RT draw and purification: the image the classifier sees, in [0,1]."""
        return self.restore(*self.rt(x, generator))

    def restore(self, x_rt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The purifier's answer to an RT'd image, as the classifier sees it (full or composite output).
        Without a purifier (the RT-only baseline) the classifier sees the RT'd image itself."""
        if self.purifier is None:
            return x_rt
        return compose(x_rt, mask, self.purifier(x_rt, mask)[1], self.config.output)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.config.draws == 1:
            return self.classifier(self.purify(x, generator))
        # Draws are stacked along the batch so that all K run as one batch.
        repeated = x.repeat(self.config.draws, 1, 1, 1)
        logits = self.classifier(self.purify(repeated, generator))
        log_probs = torch.log_softmax(logits, dim=1).view(self.config.draws, x.shape[0], -1)
        return torch.logsumexp(log_probs, dim=0) - torch.log(torch.tensor(float(self.config.draws)))
