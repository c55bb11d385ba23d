"""The defended pipeline loaded from a classifier checkpoint and a purifier checkpoint, checked to belong together.

The exporter, the evaluation and the trainers that start from such a pair all load it here, so each of them
refuses a pair whose image sizes or classes differ instead of running a pipeline that only looks right.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from atop_models.checkpoint import BuiltModel, load_built_model
from atop_models.pipeline import DefendedClassifier, PipelineConfig, PurifierOutput
from atop_models.rt import RandomTransform, RTConfig


class MismatchedCheckpoints(ValueError):
    """The classifier and the purifier were trained for other image sizes or other classes."""


@dataclass(frozen=True)
class LoadedDefense:
    pipeline: DefendedClassifier  # in the mode its modules were built in (train); callers choose
    classifier: BuiltModel
    purifier: BuiltModel

    @property
    def image_size(self) -> int:
        return self.classifier.record["image_size"]

    @property
    def classes(self) -> list[str]:
        return self.classifier.record["classes"]


def check_pair(classifier: BuiltModel, purifier: BuiltModel) -> None:
    """Raise MismatchedCheckpoints unless both run at one image size and the purifier (when its record names
    classes: it was trained against a classifier) knows the classifier's classes."""
    sizes = classifier.record["image_size"], purifier.record["image_size"]
    if sizes[0] != sizes[1]:
        raise MismatchedCheckpoints(
            f"classifier {classifier.path} is {sizes[0]} px, purifier {purifier.path} {sizes[1]} px"
        )
    if purifier.record.get("classes", classifier.record["classes"]) != classifier.record["classes"]:
        raise MismatchedCheckpoints(
            f"purifier {purifier.path} was trained with a classifier of other classes than {classifier.path}"
        )


def load_defended(
    classifier: str | Path,
    purifier: str | Path,
    rt: RTConfig | None = None,
    output: PurifierOutput | None = None,
    draws: int | None = None,
) -> LoadedDefense:
    """RT -> purifier -> classifier from two checkpoints. The RT settings, the purifier's output and the draws
    default to those the purifier's record carries (what it was trained with); a trainer passes its own."""
    loaded_classifier = load_built_model(classifier, "classifier")
    loaded_purifier = load_built_model(purifier, "purifier")
    check_pair(loaded_classifier, loaded_purifier)
    recorded = loaded_purifier.record
    rt_config = RTConfig(**recorded["rt"]) if rt is None else rt
    trained_with = PipelineConfig(**recorded["pipeline"])
    config = PipelineConfig(
        trained_with.output if output is None else output, trained_with.draws if draws is None else draws
    )
    pipeline = DefendedClassifier(RandomTransform(rt_config), loaded_purifier.model, loaded_classifier.model, config)
    return LoadedDefense(pipeline, loaded_classifier, loaded_purifier)
