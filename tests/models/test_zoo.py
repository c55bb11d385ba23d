"""The shipped default models (models/zoo, see its README): intact, within the size budget, and as accurate
as the model card says, on 300 real CIFAR-10 test JPEGs. The floors sit ~2 standard errors of a 300-image
sample below the 10,000-image figures of the card, so they catch a broken model, not sampling noise."""

from pathlib import Path

import pytest
import torch

from atop_models.checkpoint import read_config
from atop_models.data import load_split
from atop_models.evaluate import accuracy
from atop_models.evaluation.defenses import Checkpoints, build

REPO = Path(__file__).resolve().parents[2]
ZOO = REPO / "models" / "zoo"
CHECKPOINTS = Checkpoints(
    classifier=str(ZOO / "classifier"), pretrained=str(ZOO / "purifier-pretrained"), atop=str(ZOO / "purifier")
)
SIZE_BUDGET_BYTES = 30 * 2**20  # shipped checkpoints + the shipped ONNX repository (developers' guide)

# defense -> minimum accuracy on the 300 images: the mean over RT seeds 0-4 on them (models/zoo/README.md: 91.3,
# 54.3 and 59.3%) minus ~2 of those seeds' standard deviations (3.1 and 2.7 points for the purified pipelines)
FLOORS = {"undefended": 0.87, "rt+pretrained": 0.48, "rt+atop": 0.54}


@pytest.fixture(scope="module")
def test_images(cifar_test_folder, tmp_path_factory):
    return load_split(cifar_test_folder, "test", 32, tmp_path_factory.mktemp("cache"))


def test_shipped_files_fit_the_size_budget():
    shipped = [p for root in (ZOO, REPO / "model_repository") for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in shipped) < SIZE_BUDGET_BYTES


def test_shipped_checkpoints_share_one_lineage():
    classifier = read_config(CHECKPOINTS.classifier)
    atop = read_config(CHECKPOINTS.atop)
    pretrained = read_config(CHECKPOINTS.pretrained)
    assert atop["lineage"]["classifier"]["sha256"] == classifier["weights_sha256"]
    stages, stage = [], atop["lineage"]["pretrained_purifier"]
    while stage is not None:  # every stage the served purifier was trained from, down to the first pretraining
        stages.append(stage["sha256"])
        stage = stage.get("lineage", {}).get("pretrained_purifier")
    assert pretrained["weights_sha256"] in stages  # the baseline is one of them (pretraining has several stages)
    assert atop["classes"] == pretrained["classes"] == classifier["classes"]


@pytest.mark.parametrize("defense", sorted(FLOORS))
def test_shipped_model_accuracy_floor(defense, test_images):
    torch.manual_seed(0)  # the RT draws; the floor holds for any seed, this one only makes reruns identical
    model, _ = build(defense, CHECKPOINTS, torch.device("cpu"))  # loading checks every weight file's sha256
    with torch.no_grad():
        assert accuracy(model, test_images, torch.device("cpu"), 32) >= FLOORS[defense]
