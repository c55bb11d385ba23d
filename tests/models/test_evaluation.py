"""Attacks and atop-eval on a small trained classifier (and a random-weight purifier for the pipeline)."""

import json

import pytest
import torch
import torchattacks

from atop_models.attacks import FGSM, PGD, EOTGradient
from atop_models.checkpoint import load_model, read_config, save_model
from atop_models.classifiers import CLASSIFIERS
from atop_models.data import load_split
from atop_models.evaluation import named_attacks
from atop_models.evaluation.clean import main as clean_accuracy_main
from atop_models.evaluation.cli import main as atop_eval
from atop_models.evaluation.report import sanity_checks
from atop_models.evaluation.statistics import mcnemar_one_sided, wilson95
from atop_models.pipeline import DefendedClassifier, PipelineConfig
from atop_models.purifiers import PURIFIERS
from atop_models.rt import RandomTransform, RTConfig


def save_random_purifier(stem, seed: int) -> None:
    torch.manual_seed(seed)
    kwargs = {"cnum": 8, "dilations": [2, 4]}
    purifier = PURIFIERS.create("deepfillv2", **kwargs)
    meta = {"image_size": 32, "rt": RTConfig().to_dict(), "pipeline": {"output": "full", "draws": 1}}
    save_model(stem, purifier, "purifier", "deepfillv2", kwargs, **meta)


@pytest.fixture(scope="module")
def trained(synthetic_folder, trained_classifier, tmp_path_factory):
    """The trained classifier, a random-weight purifier, and the generated test images."""
    out = tmp_path_factory.mktemp("eval_models")
    save_random_purifier(out / "purifier", seed=0)
    (out / "cls").symlink_to(trained_classifier)
    classifier = load_model(out / "cls" / "classifier", "classifier")[0].eval()
    test = load_split(synthetic_folder, "test", 32, trained_classifier / "cache")
    return out, classifier, test.images.float() / 255, test.labels, synthetic_folder


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_pgd_breaks_the_undefended_classifier_and_agrees_with_torchattacks(trained):
    _, classifier, x, y, _ = trained
    assert accuracy(classifier, x, y) > 0.9
    torch.manual_seed(0)
    ours = accuracy(classifier, PGD(EOTGradient(classifier), 8 / 255, 2 / 255, 20)(x, y), y)
    theirs = accuracy(classifier, torchattacks.PGD(classifier, eps=8 / 255, alpha=2 / 255, steps=20)(x, y), y)
    assert ours <= 0.05 and abs(ours - theirs) <= 0.05
    assert accuracy(classifier, FGSM(EOTGradient(classifier), 8 / 255)(x, y), y) >= ours  # single step is weaker


@pytest.mark.parametrize("norm,epsilon", [("linf", 8 / 255), ("l2", 0.5)])
@pytest.mark.parametrize("name", ["pgd-eot", "fgsm", "transfer-pgd", "apgd-ce", "autoattack-rand"])
def test_attacks_stay_in_the_ball_and_in_range(trained, name, norm, epsilon):
    out, classifier, x, y, _ = trained
    purifier = load_model(out / "purifier", "purifier")[0].eval().requires_grad_(False)
    defense = DefendedClassifier(RandomTransform(RTConfig()), purifier, classifier, PipelineConfig()).eval()
    spec = named_attacks.parse(f"{name}:steps=3:eot=2", 3, 3, 2)
    x_adv = named_attacks.run(spec, defense, classifier, x[:8], y[:8], norm, epsilon, randomized=True, seed=0)
    delta = (x_adv - x[:8]).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= epsilon + 1e-5).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    if name in ("fgsm", "transfer-pgd"):  # no random start: a zero gradient can leave an image in place
        assert (size > 0).any()
    else:  # every image is attacked, those that one draw of the clean input already got wrong included
        assert (size > 0).all()


def test_the_robust_member_attack_runs_pgd_eot_through_the_pipeline_on_the_mixtures_robust_member(trained):
    out, classifier, x, y, _ = trained
    purifier = load_model(out / "purifier", "purifier")[0].eval().requires_grad_(False)
    members = [{"arch": "airbench", "arch_kwargs": read_config(out / "cls" / "classifier")["arch_kwargs"]}] * 2
    mixture = CLASSIFIERS.create("mixture", members=members, weight=0.6, num_classes=classifier.head.out_features)
    for member in mixture.members:
        member.load_state_dict(classifier.state_dict())
    mixture.members[1].head.weight.data.neg_()  # an accurate member that disagrees, so that the two attacks differ
    mixture.eval()
    rt = RandomTransform(RTConfig())
    spec = named_attacks.parse("pgd-eot-robust:steps=3:eot=2", 3, 3, 2)
    expected_spec = named_attacks.parse("pgd-eot:steps=3:eot=2", 3, 3, 2)
    attacked = []
    for attack, target in ((spec, mixture), (expected_spec, classifier)):
        defense = DefendedClassifier(rt, purifier, target, PipelineConfig()).eval()
        torch.manual_seed(0)
        attacked.append(named_attacks.run(attack, defense, target, x[:8], y[:8], "linf", 8 / 255, True, seed=0))
    assert torch.equal(attacked[0], attacked[1])
    with pytest.raises(ValueError, match="attacks a mixture classifier, not a"):
        named_attacks.run(spec, classifier, classifier, x[:2], y[:2], "linf", 8 / 255, False, seed=0)


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr", "autoattack-rand"])
def test_apgd_breaks_the_undefended_classifier(trained, name):
    _, classifier, x, y, _ = trained
    spec = named_attacks.parse(f"{name}:steps=10", 10, 10, 1)
    x_adv = named_attacks.run(spec, classifier, classifier, x, y, "linf", 8 / 255, randomized=False, seed=0)
    assert accuracy(classifier, x_adv, y) <= 0.1


def test_least_correct_keeps_each_images_worst_candidate(trained):
    _, classifier, x, y, _ = trained
    x_adv = PGD(EOTGradient(classifier), 8 / 255, 2 / 255, 10)(x, y)
    broken = classifier(x_adv).argmax(1) != y
    assert broken.any() and (classifier(x).argmax(1) == y).all()
    for candidates in ([x, x_adv], [x_adv, x]):
        picked = named_attacks.least_correct(classifier, candidates, y, draws=1)
        assert torch.equal(picked[broken], x_adv[broken])
    # Where both are classified correctly, the lower true-class probability decides.
    x_weak = PGD(EOTGradient(classifier), 0.5 / 255, 0.25 / 255, 2)(x, y)
    with torch.no_grad():
        true_class = [classifier(z).softmax(1).gather(1, y[:, None]).squeeze(1) for z in (x, x_weak)]
        both_right = classifier(x_weak).argmax(1) == y
    weaker = both_right & (true_class[1] < true_class[0])
    picked = named_attacks.least_correct(classifier, [x, x_weak], y, draws=1)
    assert weaker.any() and torch.equal(picked[weaker], x_weak[weaker])
    assert torch.equal(picked[both_right & ~weaker], x[both_right & ~weaker])


def test_eot_averages_independent_draws(trained):
    out, classifier, x, y, _ = trained
    purifier = load_model(out / "purifier", "purifier")[0].eval()
    defense = DefendedClassifier(RandomTransform(RTConfig()), purifier, classifier, PipelineConfig()).eval()
    x, y = x[:4], y[:4]
    torch.manual_seed(7)
    averaged = EOTGradient(defense, eot=4)(x, y)
    torch.manual_seed(7)
    singles = [EOTGradient(defense, eot=1)(x, y) for _ in range(4)]
    assert torch.allclose(averaged, torch.stack(singles).mean(0), atol=1e-6)
    assert not torch.allclose(singles[0], singles[1])  # each pass drew its own RT


def test_wilson_interval():
    assert wilson95(0, 100)[0] == 0.0 and 0.03 < wilson95(0, 100)[1] < 0.04
    low, high = wilson95(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)


def test_atop_eval_writes_report_and_resumes(trained, tmp_path):
    out, _, _, _, folder = trained
    args = [
        "--classifier",
        str(out / "cls" / "classifier"),
        "--pretrained",
        str(out / "purifier"),
        "--atop",
        str(out / "purifier"),
        "--out",
        str(tmp_path / "eval"),
        "--data-source",
        str(folder),
        "--data-cache-dir",
        str(out / "cache"),
        "--images",
        "16",
        "--batch-size",
        "8",
        "--pgd-steps",
        "3",
        "--eot",
        "2",
        "--attacks",
        "pgd-eot",
        "fgsm",
        "transfer-pgd",
        "--linf-epsilons",
        "2/255",
        "8/255",
        "64/255",
        "--defenses",
        "undefended",
        "rt+atop@2",
    ]
    atop_eval(args)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    keys = {"defense", "attack", "norm", "epsilon", "n", "clean_accuracy", "robust_accuracy", "ci95"}
    assert len(results["rows"]) == 2 * 3 * 3 and all(keys <= set(r) for r in results["rows"])
    undefended = {(r["attack_name"], r["epsilon"]): r for r in results["rows"] if r["defense"] == "undefended"}
    assert undefended[("pgd-eot", 64 / 255)]["robust_accuracy"] <= 0.1
    # pgd-eot and fgsm are adaptive (transfer-pgd is not): one worst case per defense and epsilon.
    assert len(results["worst_case"]) == 2 * 3
    for worst in results["worst_case"]:
        assert worst["attacks"] == ["pgd-eot (3 steps, EOT 2)", "fgsm (EOT 2)"]
        assert worst["robust_accuracy"] <= worst["strongest_single"]
    assert all(len(r["robust_mask"]) == r["n"] == 16 for r in results["rows"])
    assert results["checkpoints"]["classifier"]["sha256"] == read_config(args[1])["weights_sha256"]
    checks = {c["check"] for c in results["sanity_checks"]}
    assert {"iterative >= single-step", "white-box >= transfer", "accuracy -> ~0 at large epsilon"} <= checks
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| undefended | pgd-eot" in report and "Sanity checks" in report and "Worst case" in report
    for png in ("accuracy_vs_epsilon.png", "examples_undefended.png", "examples_rt_atop_2.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 5000
    progress = (tmp_path / "eval" / "progress.jsonl").read_text().splitlines()
    assert len(progress) == 2 * 3 * 3 * 2  # rows x batches
    for png in ("examples_undefended.png", "examples_rt_atop_2.png"):
        (tmp_path / "eval" / png).unlink()
    atop_eval(args)  # everything done: resumes without recomputing, and redraws the grids of the first run
    assert (tmp_path / "eval" / "progress.jsonl").read_text().splitlines() == progress
    report = (tmp_path / "eval" / "report.md").read_text()
    for png in ("examples_undefended.png", "examples_rt_atop_2.png"):
        assert f"({png})" in report and (tmp_path / "eval" / png).stat().st_size > 5000

    # Resuming on other weights or other images stops instead of mixing them into the kept rows.
    save_random_purifier(tmp_path / "other", seed=1)
    with pytest.raises(SystemExit, match=r"rt\+atop@2\|pgd-eot.*batch 0, was measured on other checkpoints"):
        atop_eval([a if a != str(out / "purifier") else str(tmp_path / "other") for a in args])
    with pytest.raises(SystemExit, match=r"undefended\|pgd-eot.*batch 0, was measured on other images"):
        atop_eval([a if a != "8" else "4" for a in args])  # --batch-size 4: other images in each batch
    assert (tmp_path / "eval" / "progress.jsonl").read_text().splitlines() == progress


def _row(attack_name: str, mask: str) -> dict:
    return {
        "defense": "rt+atop",
        "attack_name": attack_name,
        "attack": attack_name,
        "norm": "linf",
        "epsilon": 2 / 255,
        "adaptive": attack_name != "transfer-pgd",
        "steps": 20,
        "eot": 4,
        "robust_accuracy": mask.count("1") / len(mask),
        "robust_mask": mask,
    }


def test_sanity_checks_fail_only_on_more_than_random_transform_noise():
    assert mcnemar_one_sided(13, 7) == pytest.approx(0.1316, abs=1e-4)
    assert mcnemar_one_sided(0, 0) == 1.0
    # 25 vs 19 robust of 64, 13 vs 7 discordant (an earlier rt+pretrained at 2/255): noise, passes.
    pgd = "1" * 12 + "1" * 13 + "0" * 7 + "0" * 32
    fgsm = "1" * 12 + "0" * 13 + "1" * 7 + "0" * 32
    (noisy,) = sanity_checks([_row("pgd-eot", pgd), _row("fgsm", fgsm)])
    assert noisy["passed"] and noisy["p_value"] > 0.05 and "only under the first 13" in noisy["detail"]
    # PGD leaves 30 more images robust than FGSM, never fewer: a broken iterative attack, fails.
    (broken,) = sanity_checks([_row("pgd-eot", "1" * 40 + "0" * 24), _row("fgsm", "1" * 10 + "0" * 54)])
    assert not broken["passed"] and broken["p_value"] < 1e-6
    # Significant (40 vs 10 discordant of 1,000) but only 3 points: within the slack, passes.
    (small,) = sanity_checks([_row("pgd-eot", "1" * 40 + "0" * 960), _row("fgsm", "0" * 40 + "1" * 10 + "0" * 950)])
    assert small["passed"] and small["p_value"] < 1e-4


def test_clean_accuracy_command_is_seeded_and_matches_the_classifier(trained, tmp_path, capsys):
    out, classifier, x, y, folder = trained
    args = ["--classifier", str(out / "cls" / "classifier"), "--atop", str(out / "purifier")]
    args += ["--data-source", str(folder), "--data-cache-dir", str(out / "cache")]
    args += ["--defenses", "undefended", "rt+atop@2", "--agreement"]
    clean_accuracy_main([*args, "--out", str(tmp_path / "a.json")])
    clean_accuracy_main([*args, "--out", str(tmp_path / "b.json")])
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    without_time = [[{k: v for k, v in r.items() if k != "seconds"} for r in run["rows"]] for run in (first, second)]
    assert without_time[0] == without_time[1]
    undefended, defended = first["rows"]
    assert undefended["n"] == defended["n"] == len(y)
    assert undefended["clean_accuracy"] == pytest.approx(accuracy(classifier, x, y))
    with torch.no_grad():
        hits = (classifier(x).argmax(1) == y).tolist()
    assert undefended["correct_mask"] == "".join("1" if hit else "0" for hit in hits)
    assert defended["correct_mask"].count("1") == round(defended["clean_accuracy"] * len(y))
    assert defended["ci95"][0] <= defended["clean_accuracy"] <= defended["ci95"][1]
    assert undefended["top1_agreement"] == 1.0  # deterministic: a second pass answers the same
    assert "atop_models.evaluation.clean" in first["command"]
    sha = json.loads((out / "purifier.json").read_text())["weights_sha256"]
    assert first["checkpoints"]["atop"] == {"path": str(out / "purifier"), "sha256": sha}
    assert set(first["checkpoints"]) == {"classifier", "atop"}
