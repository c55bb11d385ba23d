"""The shipped default models (models/zoo, see its README): intact, within the size budget, and as accurate
as the model card says, on 300 real CIFAR-10 test JPEGs (the first 30 of each class). The deterministic
classifier alone must score exactly what it scored when shipped; the served pipeline must keep its floor on the
same images and RT draws."""

import json
from pathlib import Path

import onnx
import pytest
import torch

from atop_models.checkpoint import read_config, save_member, sha256_file
from atop_models.data import load_split
from atop_models.evaluation.defenses import Checkpoints, build
from atop_models.evaluation.statistics import accuracy, predictions

REPO = Path(__file__).resolve().parents[2]
ZOO = REPO / "models" / "zoo"
CHECKPOINTS = Checkpoints(classifier=str(ZOO / "classifier"), atop=str(ZOO / "purifier"))
SIZE_BUDGET_BYTES = 30 * 10**6  # shipped checkpoints + the shipped ONNX repository: 30 MB

# The shipped classifier alone: UNDEFENDED_CORRECT of the 300 images, exactly (no randomness; a changed weight
# shows).
UNDEFENDED_CORRECT = 263
# The served pipeline (RT -> purifier -> classifier, at the RT and output the purifier's record carries: no
# noise, 8 of 64 blocks masked, only the holes pasted in) on the 300 images with the RT draws of seed 0: 261
# right (seeds 0-4: 86.0% mean, sd 0.75, 255-261; docs/robustness/v11/clean-300-seeds.json). The floor leaves
# room for the last-bit differences of other CPUs, not for another seed's draws.
ATOP_FLOOR = 0.84
# v10's int8 ensemble (served alone until v11) and v1's classifier (served alone until v2), the mixture's members.
V10_ENSEMBLE = "ed2a7196c3d002afcb27e0a6601a9180da429515fec1845acbe3326089944ff9"
V1_CLASSIFIER = "59a9ef0629929835dd90d2ba57caca3c79afa7331487382cc4feb81c5dbd3e28"
# v8's classifier (the ensemble's first member, served alone until v9) and v5's purifier, fp32, by sha256: the
# shipped files are rounded from them. The purifier before AToP (no longer shipped: budget; it is in the git
# history at commit c7ed34b, models/zoo/purifier-pretrained) is recorded in the purifier's lineage.
V8_CLASSIFIER = "d3b444493e8067142f00270fba7e9a90278e29231a1d3e411cff2ce5fc9f7cb6"
V5_PURIFIER = "61a4f9afb91454b4d93eb5ff817273d19d497d0bfe32470d6fe4db5eb01f7adf"
PRETRAINED_PURIFIER = "f0190da8c1fc019bec736b9143166f0f961666647cb844e4812afc0bd9a1848b"


@pytest.fixture(scope="module")
def test_images(cifar_test_folder, tmp_path_factory):
    return load_split(cifar_test_folder, "test", 32, tmp_path_factory.mktemp("cache"))


def test_shipped_files_fit_the_size_budget():
    shipped = [p for root in (ZOO, REPO / "model_repository") for p in root.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in shipped) < SIZE_BUDGET_BYTES


def _hashes(lineage: dict) -> set[str]:
    """Every checkpoint sha256 recorded anywhere in a lineage tree."""
    found = set()
    for key, value in lineage.items():
        if key == "sha256":
            found.add(value)
        elif isinstance(value, dict):
            found |= _hashes(value)
    return found


def test_shipped_checkpoints_share_one_lineage():
    classifier = read_config(CHECKPOINTS.classifier)
    atop = read_config(CHECKPOINTS.atop)
    # v11: the served classifier mixes two classifiers' softmax outputs (arch "mixture"), 0.875 of v10's robust
    # ensemble and 0.125 of v1's accurate classifier (trained without any attack, 10 epochs), stored in int8.
    assert classifier["arch"] == "mixture" and classifier["weights_dtype"] == "int8"
    assert classifier["arch_kwargs"]["weight"] == 0.875 and classifier["arch_kwargs"]["sharpness"] == 1.0
    robust, accurate = classifier["members"]
    assert robust["weights_sha256"] == V10_ENSEMBLE and accurate["weights_sha256"] == V1_CLASSIFIER
    assert accurate["arch"] == "airbench" and accurate["arch_kwargs"]["flip_average"]
    assert "adv" not in accurate["recipe"] and accurate["recipe"]["epochs"] == 10
    # v10's ensemble is the mean of three classifiers' logits, each adversarially trained alone from scratch for
    # 30 epochs (no purifier in their lineage): v8's (64/256/256, PGD-2 then PGD-3 for the last four, on 2 CPU
    # cores) and two 1.5x wider (96/384/384, on a lent H200): PGD-3 throughout (v9's second member), and PGD-4,
    # whose divergence guard halted it in its last epoch with epoch 29 kept. The purifier (v5's) is stored in
    # fp16; every rounded record names the fp32 weights it was rounded from.
    assert robust["arch"] == "ensemble" and robust["weights_dtype"] == "int8"
    members = robust["members"]
    assert [member["arch_kwargs"].get("widths") for member in members] == [None, [96, 384, 384], [96, 384, 384]]
    assert [member["recipe"]["adv"]["steps"] for member in members] == [3, 3, 4]
    assert [member["metrics"]["epoch"] for member in members] == [30, 30, 29]
    assert all(member["recipe"]["adv"]["kind"] == "pgd" and member["recipe"]["epochs"] == 30 for member in members)
    for member in [*members, accurate]:  # each trained alone, by the classifier stage, for the same task
        assert member["recipe"]["command"] == "classifier" and "lineage" not in member
        assert member["classes"] == classifier["classes"] and member["image_size"] == classifier["image_size"]
    assert members[0]["weights_sha256"] == V8_CLASSIFIER
    assert atop["weights_dtype"] == "float16" and atop["rounded_from"] == V5_PURIFIER
    # The purifier was trained for the RT its record carries (the one the exported graph applies) and at the
    # classifier's image size; every stage it descends from is recorded, down to the first pretraining.
    assert atop["rt"] == atop["recipe"]["rt"] and atop["image_size"] == classifier["image_size"]
    assert PRETRAINED_PURIFIER in _hashes(atop["lineage"]) and atop["classes"] == classifier["classes"]


def test_the_mixture_holds_v10s_classifier_bit_for_bit(tmp_path):
    """The docs tell users who want v10 to take the mixture's robust member out of the shipped files."""
    robust = save_member(CHECKPOINTS.classifier, 0, tmp_path / "v10")
    assert sha256_file(robust) == V10_ENSEMBLE


def test_published_figures_were_measured_on_the_shipped_models():
    """models/zoo/provenance.json names the served ONNX file and the checkpoints by sha256, and the results files
    whose figures the card and docs/robustness.md publish for them: replacing a model without re-measuring fails."""
    provenance = json.loads((ZOO / "provenance.json").read_text())
    served = REPO / provenance["model_onnx"]["path"]
    assert sha256_file(served) == provenance["model_onnx"]["sha256"]
    metadata = {p.key: p.value for p in onnx.load(str(served), load_external_data=False).metadata_props}
    exported_from = {part: entry["sha256"] for part, entry in json.loads(metadata["atop.checkpoints"]).items()}
    shipped = {role: read_config(path)["weights_sha256"] for role, path in vars(CHECKPOINTS).items() if path}
    assert shipped == provenance["checkpoints"]
    assert exported_from == {"classifier": shipped["classifier"], "purifier": shipped["atop"]}
    assert provenance["figures"], "no published figure is tied to the shipped models"
    for figure in provenance["figures"]:
        recorded = json.loads((REPO / figure).read_text())["checkpoints"]
        assert {role: entry["sha256"] for role, entry in recorded.items()}.items() <= shipped.items(), figure


def test_shipped_classifier_alone_scores_exactly_as_shipped(test_images):
    model, _ = build("undefended", CHECKPOINTS, torch.device("cpu"))
    with torch.no_grad():
        correct = accuracy(model, test_images, torch.device("cpu"), 32) * len(test_images)
    assert round(correct) == UNDEFENDED_CORRECT


def test_the_served_pipeline_keeps_its_floor_on_seed_0_draws(test_images):
    model, _ = build("rt+atop", CHECKPOINTS, torch.device("cpu"))  # loading checks every weight file's sha256
    torch.manual_seed(0)  # after building: the draws the card's figure was measured with
    with torch.no_grad():
        correct = predictions(model, test_images, torch.device("cpu"), 32) == test_images.labels
    assert correct.float().mean() >= ATOP_FLOOR
