"""The trainer's steps, on tiny real models and a small generated image set."""

import contextlib
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

from atop_models.checkpoint import load_state, save_state
from atop_models.classifiers import CLASSIFIERS
from atop_models.runtime import Runtime
from atop_models.train import classifier as classifier_training
from atop_models.train import purifier as purifier_training
from atop_models.train.adversarial import AdversarialConfig
from atop_models.train.cli import main
from atop_models.train.common import DataConfig, collapse, halt_reason
from atop_models.train.loop import TrainingHalted, fit
from atop_models.train.run_dir import RunDir

CPU = Runtime(torch.device("cpu"))
TINY_CLASSIFIER = ["--arch-kwargs", '{"widths": [16, 32, 32]}', "--batch-size", "32"]
TINY_PURIFIER = ["--cnum", "8", "--disc-cnum", "8", "--disc-layers", "3", "--batch-size", "16"]


def data_config(folder: Path, tmp_path: Path, **overrides) -> DataConfig:
    return DataConfig(**{"source": str(folder), "cache_dir": str(tmp_path / "cache"), "eval_images": 0, **overrides})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_classifier_training_learns(trained_classifier):
    history = metrics(trained_classifier)
    assert [m["epoch"] for m in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.15
    assert history[-1]["test_accuracy"] >= 0.9  # 4 classes: chance is 0.25
    record = json.loads((trained_classifier / "classifier.json").read_text())
    assert record["classes"] == ["class0", "class1", "class2", "class3"] and record["recipe"]["epochs"] == 4


def pretrain_task(folder, tmp_path, **overrides):
    config = purifier_training.PretrainConfig(
        data=data_config(folder, tmp_path, train_images=64),
        cnum=8,
        disc_cnum=8,
        disc_layers=3,
        batch_size=16,
        **overrides,
    )
    (tmp_path / "run").mkdir(exist_ok=True)
    return purifier_training.build_pretrain(config, CPU, tmp_path / "run")


def grads(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_gan_gradient_reaches_the_generator(synthetic_folder, tmp_path):
    task, loader = pretrain_task(synthetic_folder, tmp_path, l1_coarse_weight=0.0, l1_refine_weight=0.0)
    x, y = next(iter(loader))
    task.train_step(x, y, epoch=0)
    assert grads(task.G.refine) > 0 and grads(task.G.coarse) > 0  # from the GAN term alone
    assert grads(task.D) > 0

    control, _ = pretrain_task(synthetic_folder, tmp_path, l1_coarse_weight=0.0, l1_refine_weight=0.0, gan_weight=0.0)
    control.train_step(x, y, epoch=0)
    assert grads(control.G) == 0


def test_pretraining_reduces_reconstruction_loss(synthetic_folder, tmp_path):
    task, loader = pretrain_task(synthetic_folder, tmp_path, lr=2e-3)
    x, y = next(iter(loader))
    first = [task.train_step(x, y, 0)["l1_refine"] for _ in range(3)]
    for _ in range(25):
        task.train_step(x, y, 0)
    last = [task.train_step(x, y, 0)["l1_refine"] for _ in range(3)]
    assert sum(last) < 0.7 * sum(first)


@pytest.mark.parametrize("attack", ["pgd-pipeline", "fgsm-classifier"])
def test_finetune_trains_the_purifier_through_the_frozen_classifier(
    attack, synthetic_folder, trained_classifier, tmp_path
):
    pretrained, _ = pretrain_task(synthetic_folder, tmp_path)
    pretrained._save(0, {})
    config = purifier_training.FinetuneConfig(
        data=data_config(synthetic_folder, tmp_path, train_images=64),
        batch_size=16,
        attack=attack,
        attack_steps=2,
        ce_warmup_epochs=1,
        l1_coarse_weight=0.0,
        l1_refine_weight=0.0,
        gan_weight=0.0,
        ce_weight=1.0,
        purifier=str(tmp_path / "run" / "purifier"),
        classifier=str(trained_classifier / "classifier"),
    )
    (tmp_path / "ft").mkdir()
    task, loader = purifier_training.build_finetune(config, CPU, tmp_path / "ft")
    frozen_before = {k: v.clone() for k, v in task.classifier.state_dict().items()}
    g_before = {k: v.clone() for k, v in task.G.state_dict().items()}
    x, y = next(iter(loader))

    warmup = task.train_step(x, y, epoch=0)
    assert "ce_adv" not in warmup and grads(task.G) == 0  # CE term off during warm-up; others weighted 0 here

    # The purifier's mode in each of its forward passes: the attack sees it in eval mode even when the last
    # step left it in train mode; the training pass then runs in train mode.
    modes = []
    task.G.register_forward_pre_hook(lambda module, inputs: modes.append(module.training))
    built_attack = task.train_attack
    step = task.train_step(x, y, epoch=1)
    assert task.train_attack is built_attack  # built once, not per step
    attacked_passes = config.attack_steps if attack == "pgd-pipeline" else 0  # FGSM attacks the bare classifier
    assert modes == [False] * attacked_passes + [True]
    assert "ce_adv" in step and grads(task.G) > 0  # the CE term's gradient reaches the purifier
    assert not any(p.requires_grad for p in task.classifier.parameters())
    assert not task.classifier.training
    for key, value in task.classifier.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key  # weights and BN statistics untouched
    assert any(not torch.equal(v, g_before[k]) for k, v in task.G.state_dict().items())


class Interrupt(Exception):
    pass


class InterruptingTask:
    """Wraps a real task and stops the run after a number of steps, as a kill would; `step_seconds` makes each
    step take at least that long (a stand-in for a slow machine, so the time an epoch ran is known)."""

    def __init__(self, task, stop_after: int | None, step_seconds: float = 0.0):
        self.task, self.stop_after, self.step_seconds, self.steps = task, stop_after, step_seconds, 0

    def train_step(self, x, y, epoch):
        if self.stop_after is not None and self.steps == self.stop_after:
            raise Interrupt
        self.steps += 1
        time.sleep(self.step_seconds)
        return self.task.train_step(x, y, epoch)

    def __getattr__(self, name):
        return getattr(self.task, name)


def small_classifier_config(folder: Path, tmp_path: Path, **overrides) -> classifier_training.ClassifierConfig:
    return classifier_training.ClassifierConfig(
        data=data_config(folder, tmp_path), arch_kwargs={"widths": [8, 16, 16]}, batch_size=32, **overrides
    )


def test_whitening_statistics_cover_every_class(synthetic_folder, tmp_path):
    config = small_classifier_config(synthetic_folder, tmp_path, whiten_images=8)
    train, _ = config.data.load()
    assert train.labels[:8].unique().tolist() == [0]  # sorted by class, as ImageFolder splits come
    balanced = train.subset(8)
    assert sorted(balanced.labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    (tmp_path / "run").mkdir()
    task, _ = classifier_training.build(config, CPU, tmp_path / "run")
    expected = CLASSIFIERS.create(config.arch, **config.arch_kwargs, num_classes=4)
    expected.init_whitening(balanced.images.float() / 255.0)
    assert torch.allclose(task.model.whiten.weight, expected.whiten.weight)


def test_a_batch_larger_than_the_subset_names_the_flags_to_change(synthetic_folder, tmp_path, capsys):
    args = ["--out", tmp_path / "run", "--data-source", synthetic_folder, "--data-cache-dir", tmp_path / "cache"]
    with pytest.raises(SystemExit) as exit_info:
        main(["classifier", *map(str, args), "--data-train-images", "40", "--batch-size", "64"])
    error = capsys.readouterr().err.splitlines()[-1]  # after the decoding progress bar
    assert exit_info.value.code == 2 and error.startswith("atop-train classifier: error: 40 images over 1 process")
    assert "make no batch of 64: lower --batch-size" in error


def train_epochs(task, loader, epochs: range) -> None:
    for epoch in epochs:
        loader.set_epoch(epoch)
        for x, y in loader:
            task.train_step(x, y, epoch)


def test_stem_bias_trains_only_its_epochs(synthetic_folder, tmp_path):
    config = small_classifier_config(synthetic_folder, tmp_path, epochs=1, whiten_bias_epochs=1, lookahead_every=0)
    (tmp_path / "run").mkdir()
    task, loader = classifier_training.build(config, CPU, tmp_path / "run")
    start = task.model.whiten.bias.detach().clone()
    train_epochs(task, loader, range(1))
    after_first = task.model.whiten.bias.detach().clone()
    assert not torch.equal(after_first, start)
    train_epochs(task, loader, range(1, 2))
    assert torch.equal(task.model.whiten.bias, after_first)


def test_classifier_run_ends_on_its_lookahead_average(synthetic_folder, tmp_path):
    config = small_classifier_config(synthetic_folder, tmp_path, epochs=2, lookahead_every=5)
    (tmp_path / "run").mkdir()
    task, loader = classifier_training.build(config, CPU, tmp_path / "run")
    assert (2 * len(loader)) % 5  # the last step is not a regular sync: only the final one makes them equal
    start = {k: v.clone() for k, v in task.lookahead.average.items()}
    train_epochs(task, loader, range(2))
    state = task.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in task.lookahead.average.items())
    assert "groups.0.body.2.running_mean" in task.lookahead.average  # BN statistics are averaged too
    assert not torch.equal(start["head.weight"], task.lookahead.average["head.weight"])


def test_lookahead_blends_the_last_steps_in_when_the_run_ends_on_a_sync(synthetic_folder, tmp_path):
    config = small_classifier_config(synthetic_folder, tmp_path, epochs=1, lookahead_every=8)
    (tmp_path / "run").mkdir()
    task, loader = classifier_training.build(config, CPU, tmp_path / "run")
    assert task.total_steps == 8  # the only sync is on the last step: without its blend the run ends where it began
    start = task.model.head.weight.detach().clone()
    train_epochs(task, loader, range(1))
    assert not torch.equal(task.model.head.weight, start)
    assert torch.equal(task.model.head.weight, task.lookahead.average["head.weight"])


def test_interrupted_run_resumes_mid_epoch(synthetic_folder, tmp_path):
    config = small_classifier_config(synthetic_folder, tmp_path, epochs=2)
    run_path = tmp_path / "run"

    def attempt(stop_after, restart=False, step_seconds=0.0):
        run = RunDir(run_path, CPU)
        resume = run.start("classifier", config, restart)
        task, loader = classifier_training.build(config, CPU, run_path)
        wrapped = InterruptingTask(task, stop_after, step_seconds)
        with contextlib.suppress(Interrupt):
            fit(wrapped, loader, run, CPU, config.epochs, config.seed, checkpoint_minutes=0.0, resume=resume)
        return wrapped.steps, len(loader)

    done, per_epoch = attempt(stop_after=3, restart=True, step_seconds=4.0)  # killed in epoch 1 after 3 steps
    assert done == 3 and not (run_path / "metrics.jsonl").exists()
    assert (run_path / "progress.safetensors").exists() and not (run_path / "state.safetensors").exists()
    done, _ = attempt(stop_after=None)
    assert done == 2 * per_epoch - 3  # resumed at batch 3 of epoch 1, not from scratch
    assert [m["epoch"] for m in metrics(run_path)] == [1, 2]
    # epoch 1's cost includes the 12 s it ran before the kill, not only the quick steps after the resume (a whole
    # epoch of them took 6 s on a loaded machine: the margin is wide so the comparison holds under load)
    assert metrics(run_path)[0]["train_seconds"] >= 12.0 > metrics(run_path)[1]["train_seconds"]
    done, _ = attempt(stop_after=None)
    assert done == 0  # already finished: nothing redone
    assert not (run_path / "progress.safetensors").exists()  # dropped at each kept epoch's end

    # The resumed run ends exactly where an uninterrupted one does: weights, BN statistics, the Lookahead
    # average and the optimizer's momentum were all restored, not only the step count.
    resumed = load_state(run_path / "state.safetensors")["task"]
    uninterrupted_path = tmp_path / "uninterrupted"
    run = RunDir(uninterrupted_path, CPU)
    run.start("classifier", config, restart=True)
    task, loader = classifier_training.build(config, CPU, uninterrupted_path)
    fit(task, loader, run, CPU, config.epochs, config.seed, checkpoint_minutes=60.0, resume=False)
    expected = task.state_dict()
    for part in ("model", "lookahead"):
        for name, value in expected[part].items():
            assert torch.equal(resumed[part][name], value), f"{part}.{name}"
    for key, value in expected["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][key]["momentum_buffer"], value["momentum_buffer"])

    other = classifier_training.ClassifierConfig(data=config.data, batch_size=16)
    with pytest.raises(SystemExit, match="another config"):
        RunDir(run_path, CPU).start("classifier", other, restart=False)


def test_a_run_from_before_a_setting_existed_resumes_at_its_default(synthetic_folder, tmp_path):
    config = small_classifier_config(synthetic_folder, tmp_path, epochs=1)
    run_path = tmp_path / "run"
    run = RunDir(run_path, CPU)
    run.start("classifier", config, restart=True)
    task, loader = classifier_training.build(config, CPU, run_path)
    fit(task, loader, run, CPU, 1, config.seed, 60.0, resume=False)
    record = json.loads((run_path / "config.json").read_text())
    del record["config"]["precision"]  # as written before the setting existed (runs of 2026-12-04 did)
    del record["config"]["adv"]["eot"]  # at any depth
    (run_path / "config.json").write_text(json.dumps(record))
    assert RunDir(run_path, CPU).start("classifier", config, restart=False)  # the old behaviour: resumes
    assert "precision" in json.loads((run_path / "config.json").read_text())["config"]
    (run_path / "config.json").write_text(json.dumps(record))
    fp32 = dataclasses.replace(config, precision="fp32")  # not the default: another config
    with pytest.raises(SystemExit, match="another config"):
        RunDir(run_path, CPU).start("classifier", fp32, restart=False)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_training_step_runs_at_the_precision_asked_for(synthetic_folder, tmp_path, precision, dtype):
    config = small_classifier_config(synthetic_folder, tmp_path, precision=precision, adv=AdversarialConfig("pgd"))
    (tmp_path / "run").mkdir()
    task, loader = classifier_training.build(config, CPU, tmp_path / "run")
    seen = []
    task.model.head.register_forward_hook(lambda module, inputs, output: seen.append((module.training, output.dtype)))
    x, y = next(iter(loader))
    step = task.train_step(x, y, epoch=0)
    assert (True, dtype) in seen  # the step's own forward pass
    assert {d for training, d in seen if not training} == {torch.float32}  # the PGD examples' passes: fp32
    assert math.isfinite(step["loss"])


def test_collapse_separates_a_diverged_run_from_a_dip_and_from_noise():
    # The 15-epoch baseline run that diverged: 42.8% after epoch 1, 25.6% after epoch 2, on 1,000 test images.
    assert "fell to 25.6%, 17.2% below its best epoch's 42.8%" in collapse(0.428, 0.256, 1000, 0.1)
    assert collapse(0.692, 0.687, 1000, 0.1) is None  # the 13-epoch run's largest dip (epoch 8 -> 9)
    assert collapse(0.75, 0.5, 16, 0.1) is None  # 4 of 16 images: within a small check set's noise
    assert collapse(0.428, 0.256, 1000, 0.2) is None  # a wider --collapse-drop tolerates it
    assert collapse(0.428, 0.256, 1000, 1.0) is None  # 1: never


def test_halt_reason_reads_an_epochs_metrics():
    # Clean accuracy on 1,000 test images; the training attack (N-FGSM) on 500, measured after the epoch named.
    on_500 = {"training_attack_images": 500}
    healthy = {"training_attack_accuracy": 0.476, "training_attack_clean_accuracy": 0.762}  # v6's classifier
    assert halt_reason(0.752, 0.765, 1000, healthy | on_500, 0.1) == ""
    leaking = {"training_attack_accuracy": 0.55, "training_attack_clean_accuracy": 0.182}  # 15 epochs, seed 1
    reason = halt_reason(0.203, 0.183, 1000, leaking | on_500, 0.1)  # not a collapse (20.3% -> 18.3%): a leak
    assert reason.startswith("the training attack's examples score 55.0% against 18.2% clean on 500 test images")
    both = halt_reason(0.428, 0.183, 1000, leaking | on_500, 0.1)
    assert "fell to 18.3%" in both and "reads the label from the perturbation" in both
    assert halt_reason(0.428, 0.256, 1000, {}, 0.1).startswith("clean test accuracy")


def test_an_adversarial_run_checks_its_training_attack_every_epoch(synthetic_folder, tmp_path):
    adv = AdversarialConfig(kind="n-fgsm")
    config = small_classifier_config(synthetic_folder, tmp_path, epochs=2, adv=adv, leak_check_images=16)
    run_path = tmp_path / "run"
    run = RunDir(run_path, CPU)
    run.start("classifier", config, restart=True)
    task, loader = classifier_training.build(config, CPU, run_path)
    fit(task, loader, run, CPU, 2, config.seed, 60.0, resume=False)
    for epoch in metrics(run_path):
        assert epoch["training_attack_images"] == 16 and "halted" not in epoch
        assert 0 <= epoch["training_attack_accuracy"] <= 1 and 0 <= epoch["training_attack_clean_accuracy"] <= 1
    assert json.loads((run_path / "classifier.json").read_text())["metrics"]["epoch"] == 2


def test_a_diverged_run_stops_and_keeps_the_previous_epochs_classifier(synthetic_folder, tmp_path):
    # lr 1e-9: the net stays near chance, so once its state says an earlier epoch scored 100%, epoch 2 has fallen.
    config = small_classifier_config(synthetic_folder, tmp_path, epochs=2, lr=1e-9)
    run_path = tmp_path / "run"
    run = RunDir(run_path, CPU)
    run.start("classifier", config, restart=True)
    task, loader = classifier_training.build(config, CPU, run_path)
    with contextlib.suppress(Interrupt):  # stopped at epoch 2's first step: epoch 1 is saved whole
        fit(InterruptingTask(task, len(loader)), loader, run, CPU, 2, config.seed, 60.0, resume=False)
    state = load_state(run.state_path)
    assert state["epoch"] == 1 and state["task"]["best_test_accuracy"] == metrics(run_path)[0]["test_accuracy"]
    state["task"]["best_test_accuracy"] = 1.0
    save_state(run.state_path, state)
    epoch_1_weights = (run_path / "classifier.safetensors").read_bytes()

    options = ["--data-source", str(synthetic_folder), "--data-cache-dir", str(tmp_path / "cache")]
    options += ["--data-eval-images", "0", "--arch-kwargs", '{"widths": [8, 16, 16]}', "--batch-size", "32"]
    options += ["--out", str(run_path), "--epochs", "2", "--lr", "1e-9", "--checkpoint-minutes", "0"]
    halted = r"stopped at epoch 2: clean test accuracy fell to .* rerun with another --seed or a stronger training "
    halted += r"attack \(more --adv-steps, its --adv-step-size\) to go on from the end of"
    with pytest.raises(SystemExit, match=halted + " epoch 1, the last one kept, or with --restart"):
        main(["classifier", *options])  # saving its progress after every step of epoch 2
    last = metrics(run_path)[-1]
    assert last["epoch"] == 2 and "below its best epoch's 100.0%" in last["halted"] and last["seed"] == 0
    assert (run_path / "classifier.safetensors").read_bytes() == epoch_1_weights  # the diverged epoch not kept
    # nor its end or its progress: the folder resumes from the end of epoch 1, not from late in the bad epoch 2
    state = load_state(run.state_path)
    assert not run.progress_path.exists() and (state["epoch"], state["batch"]) == (1, 0)
    task, loader = classifier_training.build(config, CPU, run_path)
    with pytest.raises(TrainingHalted, match="epoch 2"):  # and resuming it as it was halts again, as it should
        fit(task, loader, run, CPU, 2, config.seed, 60.0, resume=True)

    refused = r"another config; .* a halted run may only change --seed, --adv-steps, --adv-step-size"
    with pytest.raises(SystemExit, match=refused):
        main(["classifier", *options[:-4], "--lr", "1e-3", "--seed", "1"])
    with pytest.raises(SystemExit, match=halted):  # another seed goes on from epoch 1 (and halts again here)
        main(["classifier", *options, "--seed", "1"])
    with pytest.raises(SystemExit, match=halted):  # so does a stronger training attack
        main(["classifier", *options, "--seed", "1", "--adv-steps", "3", "--adv-step-size", "0.02"])
    # each epoch's line names the seed and attack strength it ran with; config.json holds the latest
    ran_with = [(m["epoch"], m["seed"], m["adv_steps"], m["adv_step_size"]) for m in metrics(run_path)[-3:]]
    assert ran_with == [(2, 0, 2, 5 / 255), (2, 1, 2, 5 / 255), (2, 1, 3, 0.02)]
    assert json.loads((run_path / "config.json").read_text())["config"]["adv"]["steps"] == 3


def small_run_options(folder: Path, tmp_path: Path) -> list[str]:
    """CLI options of a one-epoch run on 32 training and 16 test images."""
    data = ["--data-source", str(folder), "--data-cache-dir", str(tmp_path / "cache")]
    return [*data, "--data-train-images", "32", "--data-eval-images", "16", "--epochs", "1"]


def test_cli_runs_the_whole_recipe(synthetic_folder, trained_classifier, tmp_path):
    common = small_run_options(synthetic_folder, tmp_path)
    classifier = str(trained_classifier / "classifier")
    main(["pretrain", "--out", str(tmp_path / "pre"), *common, *TINY_PURIFIER, "--classifier", classifier])
    main(
        [
            "finetune",
            "--out",
            str(tmp_path / "ft"),
            *common,
            "--batch-size",
            "16",
            "--ce-warmup-epochs",
            "0",
            "--attack-steps",
            "1",
            "--eval-robust-images",
            "8",
            "--purifier",
            str(tmp_path / "pre" / "purifier"),
            "--classifier",
            classifier,
        ]
    )
    (last,) = metrics(tmp_path / "ft")
    assert 0 <= last["pipeline_accuracy"] <= 1 and "robust_accuracy_pgd1_eot1" in last and "train_ce_adv" in last
    record = json.loads((tmp_path / "ft" / "purifier.json").read_text())
    assert record["rt"] == {"noise_sigma": 0.25, "grid": 8, "mask_fraction": 0.25}
    assert record["pipeline"]["output"] == "full" and record["classes"][0] == "class0"
    pretrained = json.loads((tmp_path / "pre" / "purifier.json").read_text())
    assert record["lineage"]["pretrained_purifier"]["sha256"] == pretrained["weights_sha256"]
    assert (tmp_path / "ft" / "samples.png").stat().st_size > 1000

    # A second stage from a purifier shipped without its discriminator (as models/zoo ships them).
    shipped = tmp_path / "zoo"
    shipped.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(tmp_path / "ft" / f"purifier{suffix}", shipped / f"purifier{suffix}")
    stage2 = ["finetune", *common, "--batch-size", "16", "--ce-warmup-epochs", "0", "--attack-steps", "1"]
    stage2 += ["--eval-robust-images", "0", "--lr", "1e-5", "--purifier", str(shipped / "purifier")]
    stage2 += ["--classifier", classifier, "--disc-cnum", "8", "--disc-layers", "3"]
    with pytest.raises(SystemExit, match="--discriminator new"):
        main([*stage2, "--out", str(tmp_path / "ft2-missing")])
    main([*stage2, "--out", str(tmp_path / "ft2"), "--discriminator", "new"])
    lineage = json.loads((tmp_path / "ft2" / "purifier.json").read_text())["lineage"]
    assert lineage["discriminator"] == "new" and lineage["pretrained_purifier"]["sha256"] == record["weights_sha256"]
    assert lineage["pretrained_purifier"]["lineage"]["pretrained_purifier"]["sha256"] == pretrained["weights_sha256"]
