"""atop-eval: adaptive attacks through the whole defended pipeline, with baselines, a report and plots.

  atop-eval --classifier C --pretrained P --atop A --out runs/eval            # PGD-200 + EOT-20, l_inf 8/255
  atop-eval ... --attacks pgd-eot autoattack-rand fgsm transfer-pgd --norms linf l2
  atop-eval ... --fast                        # CPU defaults: 64 images, PGD-20, APGD-20, EOT-4 (flags still win)

Writes <out>/results.json (rows: defense, attack, norm, epsilon, n, clean_accuracy, robust_accuracy, ci95),
<out>/report.md, accuracy_vs_epsilon.png and examples_<defense>.png; rerunning resumes from progress.jsonl
(and examples_<defense>.safetensors, the attacked batch each grid shows).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from atop_models.checkpoint import read_config
from atop_models.data import DEFAULT_SOURCE, SOURCE_HELP, load_split
from atop_models.evaluation import defenses, report
from atop_models.evaluation.runner import EvalConfig, evaluate, example_batch_file
from atop_models.runtime import setup_runtime


def epsilon(text: str) -> float:
    """'8/255' or '0.5'."""
    return float(Fraction(text))


def default_defenses(checkpoints: defenses.Checkpoints) -> list[str]:
    """Every defense the given checkpoints allow: the bare classifier, and RT with each purifier given."""
    return [
        d
        for d in defenses.NAMES
        if d == "undefended"
        or (d == "rt" and (checkpoints.pretrained or checkpoints.atop))
        or (d == "rt+pretrained" and checkpoints.pretrained)
        or (d == "rt+atop" and checkpoints.atop)
    ]


def write_report(
    rows: list[dict], built: dict[str, tuple], classes: list[str], out: Path, meta: dict[str, Any]
) -> dict[str, Any]:
    """Each defense's example grid (from the attacked batch evaluate kept), then results.json and report.md."""
    example_defenses = []
    for name, (defense, _) in built.items():
        grid = example_batch_file(out, name)
        if grid.exists():
            batch = load_file(grid)  # plot_examples moves it to the defense's device
            report.plot_examples(name, defense, classes, batch["x"], batch["x_adv"], grid.with_suffix(".png"))
            example_defenses.append(name)
    with torch.no_grad():
        return report.write(rows, out, meta | {"example_defenses": example_defenses})


def print_summary(payload: dict[str, Any]) -> None:
    for row in payload["rows"]:
        print(
            f"{row['defense']:>16} {row['attack']:<48} {row['norm']} {row['epsilon']:.4f} "
            f"clean {row['clean_accuracy']:.3f} robust {row['robust_accuracy']:.3f} (n={row['n']})"
        )
    for worst in payload["worst_case"]:
        print(
            f"{worst['defense']:>16} {'worst case of ' + str(len(worst['attacks'])) + ' adaptive attacks':<48} "
            f"{worst['norm']} {worst['epsilon']:.4f} robust {worst['robust_accuracy']:.3f} (n={worst['n']})"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="atop-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = EvalConfig(defenses.Checkpoints(""))
    parser.add_argument("--classifier", required=True, help="classifier checkpoint")
    parser.add_argument("--pretrained", default="", help="purifier checkpoint before AToP fine-tuning")
    parser.add_argument("--atop", default="", help="AToP fine-tuned purifier checkpoint")
    parser.add_argument("--out", required=True, type=Path, help="output folder (an existing one resumes)")
    parser.add_argument(
        "--defenses",
        nargs="+",
        default=None,
        help=f"of {', '.join(defenses.NAMES)}, each optionally @K draws (default: those the checkpoints allow)",
    )
    parser.add_argument(
        "--attacks",
        nargs="+",
        default=list(defaults.attacks),
        help="pgd-eot, apgd-ce, apgd-dlr, autoattack-rand, fgsm, pgd-eot-robust (mixtures), transfer-pgd; "
        "overrides as pgd-eot:steps=400:eot=40",
    )
    parser.add_argument("--norms", nargs="+", choices=["linf", "l2"], default=list(defaults.norms))
    parser.add_argument("--linf-epsilons", nargs="+", type=epsilon, default=list(defaults.linf_epsilons))
    parser.add_argument("--l2-epsilons", nargs="+", type=epsilon, default=list(defaults.l2_epsilons))
    parser.add_argument("--pgd-steps", type=int, default=defaults.pgd_steps)
    parser.add_argument("--apgd-steps", type=int, default=defaults.apgd_steps)
    parser.add_argument("--eot", type=int, default=defaults.eot)
    parser.add_argument("--images", type=int, default=512, help="class-balanced test images (the literature: 512)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--fast", action="store_true", help="CPU settings: 64 images, PGD-20, APGD-20, EOT-4")
    parser.add_argument("--data-source", default=DEFAULT_SOURCE, help=SOURCE_HELP + " (default: %(default)s)")
    parser.add_argument("--data-cache-dir", default=".data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    if args.fast:  # new defaults: options given explicitly still win
        parser.set_defaults(images=64, pgd_steps=20, apgd_steps=20, eot=4)
        args = parser.parse_args(argv)
    checkpoints = defenses.Checkpoints(args.classifier, args.pretrained, args.atop)
    chosen = args.defenses or default_defenses(checkpoints)
    command = shlex.join(["atop-eval", *(sys.argv[1:] if argv is None else argv)])
    config = EvalConfig(
        checkpoints,
        tuple(chosen),
        tuple(args.attacks),
        tuple(args.norms),
        tuple(args.linf_epsilons),
        tuple(args.l2_epsilons),
        args.pgd_steps,
        args.apgd_steps,
        args.eot,
        args.batch_size,
        args.seed,
    )
    runtime = setup_runtime(args.device)
    classifier_record = read_config(args.classifier)
    data = load_split(args.data_source, "test", classifier_record["image_size"], args.data_cache_dir, count=args.images)
    rows, built = evaluate(config, data, args.out, runtime.device)
    meta = {"command": command, "data": args.data_source, "checkpoints": defenses.provenance(checkpoints)}
    print_summary(write_report(rows, built, data.classes, args.out, meta))


if __name__ == "__main__":
    main()
