"""`atop-train pipeline` and the adversarial-training options, on tiny real models and generated images."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_training import CPU, TINY_CLASSIFIER, data_config, metrics, pretrain_task, small_run_options

from atop_models.attacks import FGSM, EOTGradient, NoisyFGSM
from atop_models.checkpoint import load_model
from atop_models.rt import RTConfig
from atop_models.train import classifier as classifier_training
from atop_models.train import pipeline as pipeline_training
from atop_models.train.adversarial import AdversarialConfig
from atop_models.train.cli import main


@pytest.fixture
def tiny_purifier(synthetic_folder, tmp_path):
    task, _ = pretrain_task(synthetic_folder, tmp_path)
    task._save(0, {})
    return tmp_path / "run" / "purifier"


def pipeline_task(synthetic_folder, classifier, purifier, tmp_path, **overrides):
    config = pipeline_training.PipelineTrainConfig(
        data=data_config(synthetic_folder, tmp_path, train_images=64),
        classifier=str(classifier),
        purifier=str(purifier),
        batch_size=16,
        eval_robust_images=0,
        **overrides,
    )
    (tmp_path / "pipe").mkdir(exist_ok=True)
    return pipeline_training.build(config, CPU, tmp_path / "pipe")


def test_noisy_fgsm_steps_from_a_noised_start_without_projecting(trained_classifier):
    model, _ = load_model(trained_classifier / "classifier", "classifier")
    model.eval()
    x = torch.rand(8, 3, 32, 32) * 0.5 + 0.25  # away from the [0,1] clip
    y = torch.arange(8) % 4
    epsilon = 4 / 255
    without_noise = NoisyFGSM(EOTGradient(model), epsilon, noise=0.0)(x, y)
    assert torch.equal(without_noise, FGSM(EOTGradient(model), epsilon)(x, y))  # no noise: exactly FGSM
    x_adv = NoisyFGSM(EOTGradient(model), epsilon, generator=torch.Generator().manual_seed(0))(x, y)
    distance = (x_adv - x).abs().amax()
    assert epsilon < distance <= 3 * epsilon + 1e-6  # noise 2 epsilon + a step of epsilon, not projected back
    with torch.no_grad():
        assert F.cross_entropy(model(without_noise), y) > F.cross_entropy(model(x), y)


def test_adversarial_fraction_keeps_the_rest_clean_and_the_mode(trained_classifier):
    model, _ = load_model(trained_classifier / "classifier", "classifier")
    model.train()
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8) % 4
    perturbed = AdversarialConfig(kind="n-fgsm", fraction=0.25).perturb(model, x, y)
    assert not torch.equal(perturbed[:2], x[:2]) and torch.equal(perturbed[2:], x[2:])
    assert model.training  # the attack ran in eval mode and gave the mode back
    assert torch.equal(AdversarialConfig(kind="none").perturb(model, x, y), x)
    with pytest.raises(ValueError, match="fraction"):
        AdversarialConfig(fraction=1.5)


def test_pipeline_training_trains_the_classifier_behind_the_frozen_purifier(
    synthetic_folder, trained_classifier, tiny_purifier, tmp_path
):
    task, loader = pipeline_task(synthetic_folder, trained_classifier / "classifier", tiny_purifier, tmp_path)
    classifier_before = {k: v.clone() for k, v in task.classifier.state_dict().items()}
    purifier_before = {k: v.clone() for k, v in task.purifier.state_dict().items()}
    x, y = next(iter(loader))
    step = task.train_step(x, y, epoch=0)
    assert set(step) == {"ce", "accuracy"}
    assert all(torch.equal(v, purifier_before[k]) for k, v in task.purifier.state_dict().items())
    assert not any(p.requires_grad for p in task.purifier.parameters())
    assert any(not torch.equal(v, classifier_before[k]) for k, v in task.classifier.state_dict().items())


def test_pipeline_training_can_train_the_purifier_too(synthetic_folder, trained_classifier, tiny_purifier, tmp_path):
    task, loader = pipeline_task(
        synthetic_folder, trained_classifier / "classifier", tiny_purifier, tmp_path, train_purifier=True
    )
    purifier_before = {k: v.clone() for k, v in task.purifier.state_dict().items()}
    x, y = next(iter(loader))
    assert "l1" in task.train_step(x, y, epoch=0)
    assert any(not torch.equal(v, purifier_before[k]) for k, v in task.purifier.state_dict().items())


def test_a_diverged_pipeline_epoch_is_not_saved(synthetic_folder, trained_classifier, tiny_purifier, tmp_path):
    """The pipeline stage halts like the classifier's: once its resumable state says an earlier epoch scored
    100% through the pipeline, this (untrained-purifier, near-chance) one has collapsed, and its pair is not
    written over the previous epoch's."""
    task, _ = pipeline_task(synthetic_folder, trained_classifier / "classifier", tiny_purifier, tmp_path)
    first = task.end_epoch(0)
    assert "halted" not in first and first["training_attack_images"] == first["eval_images"]  # N-FGSM by default
    state = task.state_dict()
    assert state["best_pipeline_accuracy"] == first["pipeline_accuracy"] < 0.5
    pair = tmp_path / "pipe" / "classifier.safetensors"
    saved = pair.read_bytes()
    task.load_state_dict(state | {"best_pipeline_accuracy": 1.0})
    halted = task.end_epoch(1)
    assert f"fell to {halted['pipeline_accuracy']:.1%}" in halted["halted"]
    assert "below its best epoch's 100.0%" in halted["halted"]
    assert pair.read_bytes() == saved and json.loads(pair.with_suffix(".json").read_text())["metrics"]["epoch"] == 1
    assert task.guard.best == 1.0  # a halted epoch never becomes the reference


def test_classifier_trains_on_adversarial_examples(synthetic_folder, tmp_path):
    config = classifier_training.ClassifierConfig(
        data=data_config(synthetic_folder, tmp_path),
        arch_kwargs={"widths": [8, 16, 16]},
        batch_size=32,
        adv=AdversarialConfig(kind="pgd", steps=1),
    )
    (tmp_path / "run").mkdir()
    task, loader = classifier_training.build(config, CPU, tmp_path / "run")
    x, y = next(iter(loader))
    seen = []
    task.trained.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    task.train_step(x, y, epoch=0)
    trained_on = seen[-1]  # the attack's own forward passes come first; the last one is the training step's
    assert not torch.allclose(trained_on, x)
    assert (trained_on - x).abs().amax() <= config.adv.epsilon + 1e-6


def test_classifier_epochs_report_a_pgd_check_that_bites(synthetic_folder, tmp_path):
    """The per-epoch check attacks the classifier it reports on at --eval-epsilon, whatever the training attack's
    radius (0 here): at a radius that can repaint the image, PGD leaves (almost) nothing of the clean accuracy,
    and the figure lands in the metrics and the checkpoint."""
    out = tmp_path / "checked"
    data = ["--data-source", str(synthetic_folder), "--data-cache-dir", str(tmp_path / "cache")]
    check = ["--adv-epsilon", "0", "--eval-epsilon", "0.5", "--eval-robust-images", "16", "--eval-attack-steps", "5"]
    main(
        [
            "classifier",
            "--out",
            str(out),
            *data,
            "--data-eval-images",
            "16",
            *TINY_CLASSIFIER,
            "--lr",
            "0.4",
            "--epochs",
            "4",
            *check,
        ]
    )
    last = metrics(out)[-1]
    assert last["robust_images"] == 16
    assert last["test_accuracy"] >= 0.75 and last["robust_accuracy_pgd5_eot1"] <= 0.25
    record = json.loads((out / "classifier.json").read_text())
    assert record["metrics"]["robust_accuracy_pgd5_eot1"] == last["robust_accuracy_pgd5_eot1"]
    assert record["recipe"]["eval_epsilon"] == 0.5 and record["recipe"]["adv"]["epsilon"] == 0


def test_cli_pipeline_stage_writes_a_pair_with_its_rt(synthetic_folder, trained_classifier, tiny_purifier, tmp_path):
    out = tmp_path / "pipe-cli"
    main(
        [
            "pipeline",
            "--out",
            str(out),
            *small_run_options(synthetic_folder, tmp_path),
            "--batch-size",
            "16",
            "--rt-noise-sigma",
            "0.06",
            "--eval-robust-images",
            "8",
            "--eval-attack-steps",
            "1",
            "--classifier",
            str(trained_classifier / "classifier"),
            "--purifier",
            str(tiny_purifier),
        ]
    )
    (last,) = metrics(out)
    assert {"pipeline_accuracy", "robust_accuracy_pgd1_eot2", "train_ce", "training_attack_accuracy"} <= set(last)
    purifier = json.loads((out / "purifier.json").read_text())
    assert RTConfig(**purifier["rt"]) == RTConfig(noise_sigma=0.06)
    classifier = json.loads((out / "classifier.json").read_text())
    assert (
        classifier["lineage"]["purifier"]["sha256"]
        == json.loads(tiny_purifier.with_suffix(".json").read_text())["weights_sha256"]
    )
    assert classifier["recipe"]["adv"]["kind"] == "n-fgsm"
    load_model(out / "classifier", "classifier")
    load_model(out / "purifier", "purifier")
