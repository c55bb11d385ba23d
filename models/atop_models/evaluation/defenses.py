"""The defenses compared, built by name from checkpoints, all as image [0,1] -> logits modules.

  undefended     the bare classifier
  rt             RT, then the classifier (no purifier)
  rt+pretrained  RT, the purifier before AToP fine-tuning, the classifier
  rt+atop        RT, the AToP fine-tuned purifier, the classifier
A suffix `@K` averages K RT draws per image (e.g. rt+atop@4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from atop_models.checkpoint import load_model, read_config
from atop_models.defended import load_defended

NAMES = ("undefended", "rt", "rt+pretrained", "rt+atop")


@dataclass(frozen=True)
class Checkpoints:
    classifier: str
    pretrained: str = ""  # purifier checkpoint before AToP
    atop: str = ""  # AToP fine-tuned purifier checkpoint


def provenance(checkpoints: Checkpoints) -> dict[str, dict[str, str]]:
    """What a figure was measured on: each given checkpoint's path and weights sha256 (results files record it,
    and a test ties the published figures to the shipped models through it)."""
    given = {"classifier": checkpoints.classifier, "pretrained": checkpoints.pretrained, "atop": checkpoints.atop}
    return {role: {"path": path, "sha256": read_config(path)["weights_sha256"]} for role, path in given.items() if path}


def parse(name: str) -> tuple[str, int]:
    base, _, draws = name.partition("@")
    if base not in NAMES:
        raise ValueError(f"unknown defense {base!r}; known: {', '.join(NAMES)} (optionally @K draws)")
    return base, int(draws or 1)


def sources(name: str, checkpoints: Checkpoints) -> tuple[str, ...]:
    """The checkpoints defense `name` is built from: the classifier, then its purifier (whose RT settings even
    `rt` uses)."""
    base, _ = parse(name)
    if base == "undefended":
        return (checkpoints.classifier,)
    purifier_path = {
        "rt": checkpoints.atop or checkpoints.pretrained,
        "rt+pretrained": checkpoints.pretrained,
        "rt+atop": checkpoints.atop,
    }[base]
    if not purifier_path:
        raise ValueError(f"defense {name!r} needs the {'--' + base.split('+')[-1]} purifier checkpoint")
    return checkpoints.classifier, purifier_path


def build(name: str, checkpoints: Checkpoints, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(defense, its bare classifier), both in eval mode on `device`, gradients off for their weights."""
    base, draws = parse(name)
    if base == "undefended":
        classifier, _ = load_model(checkpoints.classifier, "classifier")
        classifier = classifier.eval().to(device).requires_grad_(False)
        return classifier, classifier
    loaded = load_defended(*sources(name, checkpoints), draws=draws)
    defense = loaded.pipeline.requires_grad_(False)
    if base == "rt":
        defense.purifier = None  # the RT-only baseline: only the purifier's RT settings are used
    return defense.eval().to(device), defense.classifier
