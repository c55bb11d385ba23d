"""load_defended: the one loader of a classifier + purifier pair, and the three places that use it."""

import pytest
import torch
from conftest import CIFAR_CLASSES, make_tiny_checkpoints

from atop_export.exporter import ExportConfig, export_repository
from atop_models.defended import MismatchedCheckpoints, load_defended
from atop_models.evaluation.defenses import Checkpoints, build
from atop_models.rt import RTConfig
from atop_models.runtime import Runtime
from atop_models.train import pipeline as pipeline_training
from atop_models.train import purifier as purifier_training
from atop_models.train.common import DataConfig


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A matching pair, a purifier for another image size, and one trained against other classes."""
    root = tmp_path_factory.mktemp("pairs")
    classifier, purifier = make_tiny_checkpoints(root / "match")
    _, other_size = make_tiny_checkpoints(root / "size64", size=64)
    _, other_classes = make_tiny_checkpoints(root / "classes", classes=[f"c{i}" for i in range(10)])
    return classifier, purifier, other_size, other_classes


def test_a_matching_pair_loads_with_the_purifiers_recorded_settings(pairs):
    classifier, purifier, _, _ = pairs
    loaded = load_defended(classifier, purifier)
    assert loaded.image_size == 32 and loaded.classes == CIFAR_CLASSES
    assert loaded.pipeline.rt.config == RTConfig() and loaded.pipeline.config.output == "full"
    assert loaded.pipeline.purifier is loaded.purifier.model and loaded.pipeline.classifier is loaded.classifier.model
    override = load_defended(classifier, purifier, rt=RTConfig(noise_sigma=0.1), output="composite", draws=3)
    assert override.pipeline.rt.config.noise_sigma == 0.1
    assert (override.pipeline.config.output, override.pipeline.config.draws) == ("composite", 3)


@pytest.mark.parametrize("mismatch,message", [(2, "32 px, purifier .* 64 px"), (3, "other classes")])
def test_every_user_of_a_pair_refuses_a_mismatched_one(pairs, synthetic_folder, tmp_path, mismatch, message):
    classifier, purifier = pairs[0], pairs[mismatch]
    with pytest.raises(MismatchedCheckpoints, match=message):
        load_defended(classifier, purifier)
    with pytest.raises(MismatchedCheckpoints, match=message):
        export_repository(classifier, purifier, tmp_path / "repository", ExportConfig(inputs=("float",)))
    assert not (tmp_path / "repository").exists()
    with pytest.raises(MismatchedCheckpoints, match=message):
        build("rt+atop", Checkpoints(str(classifier), atop=str(purifier)), torch.device("cpu"))
    data = DataConfig(source=str(synthetic_folder), cache_dir=str(tmp_path / "cache"), eval_images=0)
    config = pipeline_training.PipelineTrainConfig(data=data, classifier=str(classifier), purifier=str(purifier))
    with pytest.raises(MismatchedCheckpoints, match=message):
        pipeline_training.build(config, Runtime(torch.device("cpu")), tmp_path)
    finetune = purifier_training.FinetuneConfig(data=data, classifier=str(classifier), purifier=str(purifier))
    with pytest.raises(MismatchedCheckpoints, match=message):
        purifier_training.build_finetune(finetune, Runtime(torch.device("cpu")), tmp_path)
