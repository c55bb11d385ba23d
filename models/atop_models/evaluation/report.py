"""results.json, report.md, accuracy-vs-epsilon plots and example grids from evaluation rows."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import torch

from atop_models.evaluation.runner import example_stem
from atop_models.evaluation.statistics import mcnemar_one_sided, worst_case
from atop_models.pipeline import DefendedClassifier

SLACK = 0.05  # accuracy points by which a 'stronger' attack may exceed a weaker one before the check fails
# One-sided significance level of the paired test below. Against a randomized defense two attacks on the same
# 64 images differ by ~8 points from the random-transform draws alone, so a fixed slack fails on noise.
ALPHA = 0.05


def sanity_checks(rows: list[dict]) -> list[dict[str, Any]]:
    """Carlini et al. (2019): large epsilon breaks everything; iterative beats single-step; white-box beats
    transfer; doubling steps or EOT changes little."""
    checks = []
    for r in (r for r in rows if r["attack_name"] == "pgd-eot"):
        for other in rows:
            if (other["defense"], other["norm"], other["epsilon"]) != (r["defense"], r["norm"], r["epsilon"]):
                continue
            if other["attack_name"] == "fgsm":
                checks.append(_check("iterative >= single-step", r, other))
            elif other["attack_name"] == "transfer-pgd":
                checks.append(_check("white-box >= transfer", r, other))
            elif other["attack_name"] == "pgd-eot" and (
                other["steps"] >= 2 * r["steps"] or other["eot"] >= 2 * r["eot"]
            ):
                # The base attack must be about as strong as its doubled twin, else it had not converged.
                checks.append(_check("doubling steps/EOT changes little", r, other))
    curves = defaultdict(list)
    for r in rows:
        if r["adaptive"] and r["attack_name"] != "fgsm":
            curves[(r["defense"], r["attack"], r["norm"])].append(r)
    for (defense, attack, norm), curve in curves.items():
        if len(curve) >= 3:
            largest = max(curve, key=lambda r: r["epsilon"])
            detail = f"{attack}, {norm} eps {largest['epsilon']:.4g}: {largest['robust_accuracy']:.3f}"
            checks.append(
                {
                    "check": "accuracy -> ~0 at large epsilon",
                    "defense": defense,
                    "detail": detail,
                    "passed": largest["robust_accuracy"] <= SLACK,
                }
            )
    return checks


def _epsilon(row: dict) -> str:
    return f"{row['epsilon'] * 255:.3g}/255" if row["norm"] == "linf" else f"{row['epsilon']:.3g}"


def _check(name: str, attack: dict, reference: dict) -> dict[str, Any]:
    """Fails when `attack` (expected at least as strong) leaves more images robust than `reference`, by more than
    SLACK and by more than chance: one-sided exact McNemar test on the per-image masks (same images in both)."""
    excess = attack["robust_accuracy"] - reference["robust_accuracy"]
    detail = (
        f"{attack['attack']}: {attack['robust_accuracy']:.3f} vs {reference['attack']}: "
        f"{reference['robust_accuracy']:.3f}"
    )
    p_value = 0.0  # rows without masks: the slack alone decides
    if attack.get("robust_mask") and reference.get("robust_mask"):
        pairs = list(zip(attack["robust_mask"], reference["robust_mask"], strict=True))
        only_first, only_second = pairs.count(("1", "0")), pairs.count(("0", "1"))
        p_value = mcnemar_one_sided(only_first, only_second)
        detail += f"; robust only under the first {only_first}, only under the second {only_second}, p {p_value:.3f}"
    passed = not (excess > SLACK and p_value < ALPHA)
    return {"check": name, "defense": attack["defense"], "passed": passed, "detail": detail, "p_value": p_value}


def plot_curves(rows: list[dict], path: Path) -> bool:
    curves = defaultdict(list)
    for r in rows:
        if r["adaptive"]:
            curves[(r["norm"], r["attack"], r["defense"])].append(r)
    panels = sorted({(norm, attack) for norm, attack, _ in curves if len(curves[(norm, attack, _)]) >= 2})
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for axis, (norm, attack) in zip(axes[0], panels, strict=True):
        for (n, a, defense), curve in sorted(curves.items()):
            if (n, a) == (norm, attack):
                curve = sorted(curve, key=lambda r: r["epsilon"])
                scale = 255 if norm == "linf" else 1
                axis.errorbar(
                    [r["epsilon"] * scale for r in curve],
                    [r["robust_accuracy"] for r in curve],
                    yerr=[
                        [r["robust_accuracy"] - r["ci95"][0] for r in curve],
                        [r["ci95"][1] - r["robust_accuracy"] for r in curve],
                    ],
                    marker="o",
                    capsize=3,
                    label=defense,
                )
        axis.set_xlabel("epsilon (x/255)" if norm == "linf" else "epsilon (l2)")
        axis.set_ylabel("robust accuracy")
        axis.set_title(f"{norm}: {attack}", fontsize=9)
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


@torch.no_grad()
def plot_examples(
    defense_name: str, defense: torch.nn.Module, classes: list[str], x: torch.Tensor, x_adv: torch.Tensor, path: Path
) -> None:
    """Rows: clean, adversarial, adversarial after RT, purified (one RT draw); titles: predicted labels."""
    device = next(defense.parameters()).device
    x, x_adv = x.to(device), x_adv.to(device)
    panels = [("clean", x, defense(x)), ("adversarial", x_adv, defense(x_adv))]
    if isinstance(defense, DefendedClassifier):
        x_rt, mask = defense.rt(x_adv)
        purified = defense.restore(x_rt, mask)
        panels += [("after RT", x_rt, None), ("purified", purified, defense.classifier(purified))]
    figure, axes = plt.subplots(len(panels), len(x), figsize=(1.3 * len(x), 1.5 * len(panels)), squeeze=False)
    for r, (name, images, logits) in enumerate(panels):
        for c in range(len(x)):
            axis = axes[r][c]
            axis.imshow(images[c].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            if logits is not None:
                axis.set_title(classes[int(logits[c].argmax())], fontsize=7)
            if c == 0:
                axis.set_ylabel(name, fontsize=8)
    figure.suptitle(defense_name, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _worst_case_section(worst: list[dict]) -> list[str]:
    return [
        "",
        "## Worst case over the adaptive attacks",
        "",
        "An image counts as robust only if it survived every adaptive attack of its row group. Each row drew",
        "its own RT draws (clean and adversarial), so against a randomized defense this also counts an image",
        "out when any one of those draws went wrong: an attacker who may submit each attack's image once.",
        "",
        "| defense | attacks | norm | epsilon | n | robust | 95% CI | strongest single attack |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {w['defense']} | {'; '.join(w['attacks'])} | {w['norm']} | {_epsilon(w)} | {w['n']} "
            f"| {w['robust_accuracy']:.3f} | {w['ci95'][0]:.3f}-{w['ci95'][1]:.3f} | {w['strongest_single']:.3f} |"
            for w in worst
        ),
    ]


def _sanity_section(checks: list[dict]) -> list[str]:
    return [
        "",
        "## Sanity checks (Carlini et al. 2019)",
        "",
        f"A comparison fails when the attack expected to be stronger leaves more images robust than the other by "
        f"more than {SLACK:.0%} of the images and by more than chance (one-sided exact McNemar test on the paired "
        f"images, p < {ALPHA}): each attack row draws its own random transforms.",
        "",
        "| check | defense | figures | passed |",
        "|---|---|---|---|",
        *(f"| {c['check']} | {c['defense']} | {c['detail']} | {'yes' if c['passed'] else '**no**'} |" for c in checks),
    ]


def write(rows: list[dict], out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    checks = sanity_checks(rows)
    worst = worst_case(rows)
    payload = {"rows": rows, "worst_case": worst, "sanity_checks": checks, **meta}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    has_curve = plot_curves(rows, out / "accuracy_vs_epsilon.png")
    lines = [
        "# Robustness evaluation",
        "",
        f"Command: `{meta.get('command', '')}`",
        "",
        f"Images: {rows[0]['n'] if rows else 0} test images of {meta.get('data', '?')}, the same for every row.",
        "Robust = correct on the clean image and on the adversarial one (one RT draw each).",
        "",
        "| defense | attack | norm | epsilon | n | clean | robust | 95% CI |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['defense']} | {r['attack']} | {r['norm']} | {_epsilon(r)} | {r['n']} | {r['clean_accuracy']:.3f} "
            f"| {r['robust_accuracy']:.3f} | {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f} |"
        )
    if worst:
        lines += _worst_case_section(worst)
    if checks:
        lines += _sanity_section(checks)
    if has_curve:
        lines += ["", "![accuracy vs epsilon](accuracy_vs_epsilon.png)"]
    lines += [
        "",
        *[f"![{name}]({example_stem(name)}.png)" for name in meta.get("example_defenses", [])],
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return payload
