"""Probe (2026-12-05): what sharpening the served mixture's robust member (MixedNUTS's lever) can buy, read off
two passes of the mixture's own members instead of one full attack per (weight, sharpness) setting.

  clean:  both members' logits behind the served RT + purifier on N class-balanced test images (RT seed 0)
  attack: AutoAttack-rand (APGD-CE and -DLR, STEPS iterations, EOT E) on the robust member alone through the
          RT + purifier, on atop-eval's first M images in batches of 8 (resumable: one line per batch); at the
          clean image and at the point the attack keeps, both members' logits over D fresh RT draws
  report: per weight and transform of the robust member's logits (a plain scale, the mixture's sharpness, or
          MixedNUTS's nonlinear one), clean accuracy on the N, and on the M the expected robust count (the mean
          over draws of "right on the clean image and on the attacked one") two ways: with the accurate member
          as it is at that point (it was not attacked: optimistic), and with it wholly fooled (all its
          probability on the robust member's strongest wrong class: what an attack on the whole mixture reaches
          if the one on R alone found R's worst point; the figure to read)
  check:  that estimate at one setting against a direct attack on that mixture (atop-eval's results.json of the
          same M images), image by image

  python docs/robustness/probes/sharpness_probe.py clean MIXTURE N CLEAN.safetensors
  python docs/robustness/probes/sharpness_probe.py attack MIXTURE M STEPS E D ATTACK.jsonl
  python docs/robustness/probes/sharpness_probe.py report CLEAN.safetensors ATTACK.jsonl [PLOT.png]
  python docs/robustness/probes/sharpness_probe.py check ATTACK.jsonl RESULTS.json WEIGHT SHARPNESS
"""

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from common import ZOO, batches, split
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from atop_models.classifiers.mixture import mix_log_probabilities
from atop_models.defended import load_defended
from atop_models.evaluation import named_attacks
from atop_models.evaluation.compare import worst_mask
from atop_models.pipeline import DefendedClassifier

EPSILON = 8 / 255  # l_inf, the paper's budget
BATCH = 8  # atop-eval's batch for the full-strength rows
WEIGHTS = [0.5 + 0.025 * i for i in range(19)]  # the robust member's share, 0.5 .. 0.95
SHARPNESS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BOTH = (False, True)  # the accurate member as it is, then wholly fooled
Transform = Callable[[torch.Tensor], torch.Tensor]  # of the robust member's logits


def members(mixture: str) -> tuple[DefendedClassifier, nn.Module, nn.Module]:
    """The served RT + purifier with the mixture's robust member as classifier, and both members."""
    pipeline = load_defended(mixture, f"{ZOO}/purifier").pipeline.eval().requires_grad_(False)
    robust, accurate = pipeline.classifier.members
    return DefendedClassifier(pipeline.rt, pipeline.purifier, robust, pipeline.config), robust, accurate


@torch.no_grad()
def both_logits(pipeline: DefendedClassifier, accurate: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[2, B, classes]: the robust and the accurate member on one RT draw of x, purified."""
    z = pipeline.purify(x)
    return torch.stack([pipeline.classifier(z), accurate(z)])


def clean(mixture: str, count: int, out: str) -> None:
    pipeline, _, accurate = members(mixture)
    data = split("test", count)
    torch.manual_seed(0)
    logits = torch.cat([both_logits(pipeline, accurate, x) for x, _ in batches(data)], 1)
    save_file({"logits": logits, "labels": data.labels}, out)


def attack(mixture: str, count: int, steps: int, eot: int, draws: int, out: str) -> None:
    pipeline, robust, accurate = members(mixture)
    data = split("test", count)
    lines = Path(out).read_text().splitlines() if Path(out).exists() else []
    done = {json.loads(line)["batch"] for line in lines}
    spec = named_attacks.parse("autoattack-rand", steps, steps, eot)
    for batch, (x, y) in enumerate(batches(data, BATCH)):
        if batch in done:
            continue
        torch.manual_seed(1_000_003 + batch)
        x_adv = named_attacks.run(spec, pipeline, robust, x, y, "linf", EPSILON, True, batch)
        record = {"batch": batch, "labels": y.tolist()}
        for name, images in (("clean", x), ("attacked", x_adv)):
            logits = torch.stack([both_logits(pipeline, accurate, images) for _ in range(draws)], 1)
            record[name] = logits.round(decimals=4).tolist()  # [member, draw, B, classes]
        with open(out, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"batch {batch} done", flush=True)


def scaled(sharpness: float) -> Transform:
    return lambda z: sharpness * z  # the served mixture's sharpness


def nonlinear(scale: float, power: float, bias: float) -> Transform:
    """MixedNUTS's transform of the robust member's logits: scale * clamp(layer_norm(z) + bias) ** power; ReLU as
    the clamp, so that any power is defined."""
    return lambda z: scale * torch.relu(F.layer_norm(z, z.shape[-1:]) + bias) ** power


TRANSFORMS = {f"scale {s}": scaled(s) for s in SHARPNESS} | {
    f"LN {c:+} ^{p} x{s}": nonlinear(s, p, c) for s in (1, 2, 4, 8, 16) for p in (1, 2, 3, 4) for c in (-1, 0, 1)
}


def right(pair: torch.Tensor, y: torch.Tensor, weight: float, transform: Transform, fooled: bool) -> torch.Tensor:
    """Whether the mixture's answer is y, for both members' logits `pair` [2, ..., classes]; `fooled` puts all the
    accurate member's probability on the robust member's strongest wrong class."""
    robust, accurate = transform(pair[0]), pair[1]
    if fooled:
        wrong = robust.scatter(-1, y.expand(robust.shape[:-1])[..., None], -torch.inf)
        accurate = torch.full_like(robust, -1e4).scatter(-1, wrong.argmax(-1, keepdim=True), 0.0)
    return mix_log_probabilities(robust, accurate, weight).argmax(-1) == y


def attacked_logits(attack_file: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attack's labels [M] and both members' logits [2, draws, M, classes] at the clean and attacked images."""
    records = [json.loads(line) for line in Path(attack_file).read_text().splitlines()]
    labels = torch.tensor([label for r in records for label in r["labels"]])
    clean_logits, attacked = (torch.cat([torch.tensor(r[k]) for r in records], 2) for k in ("clean", "attacked"))
    return labels, clean_logits, attacked


def kept_share(
    labels: torch.Tensor,
    clean_logits: torch.Tensor,
    attacked: torch.Tensor,
    weight: float,
    transform: Transform,
    fooled: bool,
) -> torch.Tensor:
    """Per image, the share of draws on which the mixture is right on the clean image and on the attacked one."""
    kept = right(clean_logits, labels, weight, transform, False)
    return (kept & right(attacked, labels, weight, transform, fooled)).float().mean(0)


def check(attack_file: str, results_file: str, weight: float, sharpness: float) -> None:
    """The estimate (accurate member fooled) at one setting against a direct attack on that mixture, image by
    image: the direct attack's per-image worst case over its rows (atop-eval's results.json, the same images)."""
    labels, clean_logits, attacked = attacked_logits(attack_file)
    share = kept_share(labels, clean_logits, attacked, weight, scaled(sharpness), True)
    direct = torch.tensor(worst_mask(json.loads(Path(results_file).read_text()), "rt+atop"))
    print(f"estimate {share.sum():.2f}, direct attack {direct.sum()} of {len(labels)}")
    for name, images in (("never", share == 0), ("sometimes", (share > 0) & (share < 1)), ("always", share == 1)):
        held = int(direct[images].sum())
        print(f"right on {name:>9} of the draws: {images.sum():3d} images; the direct attack keeps {held}")


def report(clean_file: str, attack_file: str, png: str = "") -> None:
    clean_set = load_file(clean_file)
    labels, clean_logits, attacked = attacked_logits(attack_file)
    print(f"{len(clean_set['labels'])} clean images; {len(labels)} attacked, {clean_logits.shape[1]} draws each")
    rows = []  # (transform, weight, clean accuracy, robust count with the accurate member as is, and fooled)
    for name, transform in TRANSFORMS.items():
        for weight in WEIGHTS:
            accuracy = right(clean_set["logits"], clean_set["labels"], weight, transform, False).float().mean()
            robust = [kept_share(labels, clean_logits, attacked, weight, transform, f).sum() for f in BOTH]
            rows.append((name, weight, accuracy.item(), *(r.item() for r in robust)))
    line = "{:>14} {:6.3f} {:6.4f} {:22.2f} {:23.2f}".format
    print(f"{'transform':>14} weight  clean  robust(accurate as is)  robust(accurate fooled)")
    print("\n".join(line(*row) for row in rows if row[0].startswith("scale")))
    served = next(row for row in rows if row[:2] == ("scale 1.0", 0.875))
    print(f"each transform's best (accurate fooled) at no less clean accuracy than the served {served[2]:.4f}:")
    for name in TRANSFORMS:
        eligible = [row for row in rows if row[0] == name and row[2] >= served[2]]
        if eligible:
            print(line(*max(eligible, key=lambda row: row[4])))
    alone = ((clean_logits[0].argmax(-1) == labels) & (attacked[0].argmax(-1) == labels)).float().mean(0).sum()
    alone_clean = (clean_set["logits"][0].argmax(-1) == clean_set["labels"]).float().mean().item()
    print(f"robust member alone: {alone_clean:.4f} clean, {alone:.2f} of {len(labels)} robust")
    if png:
        plot(rows, (alone_clean, alone.item()), len(labels), png)


def plot(rows: list[tuple], alone: tuple[float, float], images: int, png: str) -> None:
    """Robust (the accurate member fooled) against clean accuracy: a line over the weights per plain scale, the
    MixedNUTS transforms as dots, the robust member alone and the served setting marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    percent = 100 / images
    figure, axes = plt.subplots(figsize=(7.5, 5))
    nonlinear = [row for row in rows if not row[0].startswith("scale")]
    axes.scatter(
        [100 * r[2] for r in nonlinear],
        [percent * r[4] for r in nonlinear],
        s=4,
        c="0.75",
        label=("MixedNUTS transforms (60 x 19 weights)"),
    )
    for sharpness in SHARPNESS:
        mine = [row for row in rows if row[0] == f"scale {sharpness}"]
        axes.plot(
            [100 * r[2] for r in mine], [percent * r[4] for r in mine], marker=".", label=f"sharpness {sharpness}"
        )
    served = next(row for row in rows if row[:2] == ("scale 1.0", 0.875))
    axes.plot(100 * served[2], percent * served[4], "k*", markersize=12, label="v11 (weight 0.875, sharpness 1)")
    axes.plot(100 * alone[0], percent * alone[1], "ks", label="robust member alone (v10)")
    axes.axvline(85, color="0.5", linestyle=":")
    axes.axhline(35, color="0.5", linestyle=":")
    axes.set_xlabel("clean accuracy behind RT + purifier, 2,000 test images (%)")
    axes.set_ylabel(f"robust (%, {images} images): AutoAttack-rand 100 x 4,\naccurate member wholly fooled")
    axes.set_title("Mixing v10's ensemble with v1's classifier: sharpening does not move the trade")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(png, dpi=120)


if __name__ == "__main__":
    torch.set_num_threads(2)
    command, *arguments = sys.argv[1:]
    if command == "clean":
        clean(arguments[0], int(arguments[1]), arguments[2])
    elif command == "attack":
        attack(arguments[0], *map(int, arguments[1:5]), arguments[5])
    elif command == "check":
        check(arguments[0], arguments[1], float(arguments[2]), float(arguments[3]))
    else:
        report(*arguments)
