"""The ablation table: one row per trained variant with its clean accuracy, its quick adaptive figure and its
training cost, from the files the trainer and the evaluators wrote.

  python -m atop_models.evaluation.ablation docs/robustness/ablation/spec.json

The spec lists rows: {"label", "clean": clean-accuracy JSON, "results": atop-eval results.json, "defense": the
row of both to take, and either "metrics": the run's metrics.jsonl (training seconds summed, plus "base_cpu_hours"
for the stages it started from) or "cpu_hours": the whole recipe's, on this project's 2 CPU cores unless
"device" names what trained it instead (e.g. "H200": then the hours are that device's); optionally "series" and
"point": rows of one series (e.g. an RT grid at one mask fraction) are joined by a line in the plot and each
marked with its point, and with a number "x" as well (e.g. the noise sigma) they get a second figure: clean and
robust accuracy against x, one line per series, x named by the spec's "series_axis"}. Paths are relative to the
spec's folder. Writes ablation.md and ablation.png (robust against clean accuracy, 95% intervals) beside the
spec, and series.png when rows have an x. Each series (a lone row is its own) gets a number, in the order the
spec first names it: the table's first column and the plot's point labels, since two dozen series outrun any
palette.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ATTACK = "pgd-eot"
MARKERS = "osD^vP*X"  # cycled with the palette's 10 colours: no two of 80 series look alike


def _pick(rows: list[dict], defense: str, source: Path) -> dict:
    for row in rows:
        if row["defense"] == defense and row.get("attack_name", ATTACK) == ATTACK and row.get("norm", "linf") == "linf":
            return row
    raise SystemExit(f"{source} has no {ATTACK} l_inf row for defense {defense!r}")


def _training_hours(metrics: Path) -> float:
    seconds = sum(json.loads(line)["train_seconds"] for line in metrics.read_text().splitlines() if line.strip())
    return seconds / 3600


def load_rows(spec_path: Path) -> list[dict[str, Any]]:
    base = spec_path.parent
    rows = []
    numbers: dict[str, int] = {}
    for entry in json.loads(spec_path.read_text())["rows"]:
        clean_file, results_file = base / entry["clean"], base / entry["results"]
        clean = _pick(json.loads(clean_file.read_text())["rows"], entry["defense"], clean_file)
        robust = _pick(json.loads(results_file.read_text())["rows"], entry["defense"], results_file)
        if "metrics" in entry:
            hours = entry.get("base_cpu_hours", 0.0) + _training_hours(base / entry["metrics"])
        else:
            hours = entry["cpu_hours"]
        series = entry.get("series") or entry["label"]
        rows.append(
            {
                "number": numbers.setdefault(series, len(numbers) + 1),
                "label": entry["label"],
                "clean": clean["clean_accuracy"],
                "clean_ci95": clean["ci95"],
                "clean_n": clean["n"],
                "robust": robust["robust_accuracy"],
                "robust_ci95": robust["ci95"],
                "robust_n": robust["n"],
                "attack": robust["attack"],
                "cpu_hours": hours,
                "device": entry.get("device"),
                "series": entry.get("series"),
                "point": entry.get("point"),
                "x": entry.get("x"),
            }
        )
    return rows


def write_table(rows: list[dict[str, Any]], path: Path) -> None:
    lines = [
        "| # | variant | clean (95% CI) | PGD-EOT robust (95% CI) | training, h on 2 cores unless named (all stages) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['number']} | {r['label']} | "
            f"{100 * r['clean']:.1f}% ({100 * r['clean_ci95'][0]:.1f}-{100 * r['clean_ci95'][1]:.1f}, "
            f"n={r['clean_n']}) | {100 * r['robust']:.1f}% ({100 * r['robust_ci95'][0]:.1f}-"
            f"{100 * r['robust_ci95'][1]:.1f}, n={r['robust_n']}) | {_cost(r)} |"
        )
    path.write_text("\n".join(lines) + "\n")


def _cost(row: dict[str, Any]) -> str:
    # A GPU's hours are not the CPU's: a row trained on one says so, or its cost would read as a 100x bargain.
    return f"{row['cpu_hours']:.2f}" + (f" on one {row['device']}" if row["device"] else "")


def _error_bars(members: list[dict[str, Any]], key: str) -> list[list[float]]:
    """matplotlib's [below, above] distances from each point to its 95% interval's ends."""
    return [
        [r[key] - r[f"{key}_ci95"][0] for r in members],
        [r[f"{key}_ci95"][1] - r[key] for r in members],
    ]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(8, 6))
    series: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(r["number"], []).append(r)
    for number, members in series.items():
        # one style per series: a grid's points share it and are joined in the order the spec lists them
        name = members[0]["series"] or members[0]["label"]
        line = axis.errorbar(
            [r["clean"] for r in members],
            [r["robust"] for r in members],
            xerr=_error_bars(members, "clean"),
            yerr=_error_bars(members, "robust"),
            marker=MARKERS[(number - 1) // 10 % len(MARKERS)],
            color=f"C{(number - 1) % 10}",
            capsize=3,
            linestyle="-" if len(members) > 1 else "none",
            elinewidth=0.6,
            label=textwrap.fill(f"{number}. {name}", 110),
        )
        for r in members:
            if r["point"] or r is members[0]:
                axis.annotate(
                    f"{number}: {r['point']}" if r["point"] else str(number),
                    (r["clean"], r["robust"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=line[0].get_color(),
                )
    axis.set_xlabel("clean accuracy (one RT draw)")
    attacks = sorted({r["attack"] for r in rows}) or [ATTACK]  # e.g. EOT 4 for the pipeline, 1 for a bare model
    axis.set_ylabel(f"robust accuracy ({' / '.join(attacks)}, l_inf 8/255)", fontsize=8)
    axis.grid(alpha=0.3)
    # below the axes: the row labels are long, and inside they hide points
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.1))
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def plot_series(rows: list[dict[str, Any]], x_label: str, path: Path) -> None:
    """Clean and robust accuracy against each series' x: a grid read along one axis, which the scatter hides."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["series"] and r["x"] is not None:
            series.setdefault(r["series"], []).append(r)
    for name, members in series.items():
        members = sorted(members, key=lambda r: r["x"])
        for axis, key in zip(axes, ("clean", "robust"), strict=True):
            axis.errorbar(
                [r["x"] for r in members],
                [r[key] for r in members],
                yerr=_error_bars(members, key),
                marker="o",
                capsize=3,
                elinewidth=0.6,
                label=name,
            )
    for axis, title in zip(
        axes, ("clean accuracy (one RT draw)", "robust accuracy (PGD-EOT, l_inf 8/255)"), strict=True
    ):
        axis.set_title(title, fontsize=9)
        axis.set_xlabel(x_label)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m atop_models.evaluation.ablation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", type=Path, help="the spec JSON (rows); outputs go beside it")
    args = parser.parse_args(argv)
    rows = load_rows(args.spec)
    write_table(rows, args.spec.with_name("ablation.md"))
    plot(rows, args.spec.with_name("ablation.png"))
    if any(r["x"] is not None for r in rows):
        x_label = json.loads(args.spec.read_text()).get("series_axis", "x")
        plot_series(rows, x_label, args.spec.with_name("series.png"))
    print(args.spec.with_name("ablation.md").read_text(), end="")


if __name__ == "__main__":
    main()
