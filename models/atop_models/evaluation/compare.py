"""Two defenses, per image, on the images both were attacked on: how many only one side keeps, and the exact
one-sided McNemar p of the larger count (the paired comparisons docs/robustness.md quotes).

  python -m atop_models.evaluation.compare A/results.json B/results.json --defense-b undefended --attack-b pgd-eot
  python -m atop_models.evaluation.compare A/clean.json B/clean.json     # clean accuracy, image by image

Each side's mask is the worst case per image over its adaptive l_inf rows of that defense (or only those of
--attack-a / --attack-b; one row: that row's mask); from two clean-accuracy files
(`python -m atop_models.evaluation.clean`), the defense row's correct images (pair them under the same --seed:
the same RT draws). atop-eval draws its images class-balanced round-robin, so
a smaller run's images are the first of a larger one's: when the counts differ, the larger side is cut to the
smaller's images, which needs the labels of the data set both ran on: --data-source, or else the one both
results files record (another data set's labels would pick other images, silently).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from atop_models.data import DOWNLOADABLE, SOURCE_HELP, balanced_indices, load_split
from atop_models.evaluation.statistics import decode_mask, mcnemar_one_sided, survivors


def worst_mask(results: dict, defense: str, attack: str = "", name: str = "results") -> list[bool]:
    """Per image: survived every adaptive l_inf attack (or every run of `attack`) of `defense` in a parsed results
    file (`name`: where it came from, for the error)."""
    rows = [
        r
        for r in results["rows"]
        if r["defense"] == defense and r["norm"] == "linf" and r["adaptive"] and r.get("robust_mask")
        if not attack or r["attack_name"] == attack
    ]
    if not rows:
        raise SystemExit(
            f"{name} has no adaptive l_inf {attack or 'attack'} row with per-image results for {defense!r}"
        )
    return survivors(rows)


def correct_mask(results: dict, defense: str, name: str = "clean file") -> list[bool]:
    """Per image: classified correctly, from the `defense` row of a parsed clean-accuracy file."""
    for row in results["rows"]:
        if row["defense"] == defense and "correct_mask" in row:
            return decode_mask(row["correct_mask"])
    raise SystemExit(f"{name} has no row with per-image results for {defense!r}")


def is_clean_file(results: dict) -> bool:
    """A clean-accuracy file (no attack rows) rather than atop-eval's results."""
    return all("attack_name" not in row for row in results["rows"])


def kept_mask(results: dict, clean: bool, defense: str, attack: str, name: str) -> list[bool]:
    """Per image, what the comparison pairs: survived (attack results) or classified correctly (`clean` files)."""
    if not clean:
        return worst_mask(results, defense, attack, name)
    if attack:
        raise SystemExit(f"{name} is a clean-accuracy file: it has no attacks to pick")
    return correct_mask(results, defense, name)


def recorded_source(*results: dict) -> str:
    """The data set both parsed results files record having run on: the labels that cut the larger run to the
    smaller's images."""
    recorded = {r.get("data") for r in results}
    if None in recorded:
        raise SystemExit("a results file does not record its data set: pass --data-source (the one both runs used)")
    if len(recorded) > 1:
        raise SystemExit(
            f"the runs record different data sets {sorted(recorded)}: their images are not the same ones unless these"
            " name one data set in two places; then pass it as --data-source"
        )
    source = recorded.pop()
    if source not in DOWNLOADABLE and not Path(source).exists():
        raise SystemExit(f"the runs' data set {source} is not on this machine: pass --data-source (a copy of it)")
    return source


def paired(a: list[bool], b: list[bool], kept: str = "robust") -> dict[str, float]:
    """The counts and the exact p; `kept` names what a True is ("robust", or "correct" for clean files)."""
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    return {
        "images": len(a),
        f"{kept}_a": sum(a),
        f"{kept}_b": sum(b),
        "only_a": only_a,
        "only_b": only_b,
        "p_one_sided": mcnemar_one_sided(max(only_a, only_b), min(only_a, only_b)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m atop_models.evaluation.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("a", type=Path, help="atop-eval results.json, or a clean-accuracy file")
    parser.add_argument("b", type=Path, help="the same kind of file as a")
    parser.add_argument("--defense-a", default="rt+atop")
    parser.add_argument("--defense-b", default="rt+atop")
    parser.add_argument("--attack-a", default="", help="only this attack's rows (e.g. pgd-eot); default: all")
    parser.add_argument("--attack-b", default="", help="as --attack-a, for b")
    parser.add_argument("--data-source", default="", help=SOURCE_HELP + " (default: the one both results files record)")
    parser.add_argument("--data-cache-dir", default=".data")
    args = parser.parse_args(argv)
    results_a, results_b = json.loads(args.a.read_text()), json.loads(args.b.read_text())
    clean = is_clean_file(results_a)
    if clean != is_clean_file(results_b):
        raise SystemExit(f"{args.a} and {args.b} are not the same kind: pair clean with clean, attacks with attacks")
    a = kept_mask(results_a, clean, args.defense_a, args.attack_a, str(args.a))
    b = kept_mask(results_b, clean, args.defense_b, args.attack_b, str(args.b))
    if len(a) != len(b):
        larger = max(len(a), len(b))
        source = args.data_source or recorded_source(results_a, results_b)
        data = load_split(source, "test", 32, args.data_cache_dir, count=larger)
        keep = balanced_indices(data.labels, len(data.classes), min(len(a), len(b))).tolist()
        a, b = ([mask[i] for i in keep] if len(mask) == larger else mask for mask in (a, b))
    print(json.dumps(paired(a, b, "correct" if clean else "robust")))


if __name__ == "__main__":
    main()
