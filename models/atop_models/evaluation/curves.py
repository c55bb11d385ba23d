"""Training curves: per-epoch metrics of one or more runs against the training hours they had spent, so runs of
different lengths and speeds (a 10-epoch baseline, a 69-epoch one) share one time axis.

  python -m atop_models.evaluation.curves runs/at-bare runs/at-eq --metrics test_accuracy \
      robust_accuracy_pgd10_eot1 --out curves.png

Reads each run's metrics.jsonl (one line per epoch, written by atop-train); a metric a run does not record is
left out of its plot rather than drawn as zero. One panel per metric, one line per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def read_epochs(run: Path) -> list[dict]:
    """The run's per-epoch metrics, in order."""
    path = run / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"{run} has no metrics.jsonl: not an atop-train run folder, or no epoch has ended yet")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(epochs: list[dict], metric: str) -> tuple[list[float], list[float]]:
    """(training hours at the end of each epoch, the metric's value) for the epochs that record the metric."""
    hours, values, spent = [], [], 0.0
    for epoch in epochs:
        spent += epoch["train_seconds"] / 3600
        if metric in epoch:
            hours.append(spent)
            values.append(epoch[metric])
    return hours, values


def plot(runs: dict[str, list[dict]], metrics: list[str], out: Path) -> None:
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        for name, epochs in runs.items():
            hours, values = series(epochs, metric)
            if values:
                axis.plot(hours, values, marker=".", label=name)
        axis.set_title(metric)
        axis.set_xlabel("training hours (sum of train_seconds)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="atop-train run folders (each holds metrics.jsonl)")
    parser.add_argument("--metrics", nargs="+", required=True, help="metrics.jsonl keys to plot, one panel each")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    runs = {run.name: read_epochs(run) for run in args.runs}
    recorded = {key for epochs in runs.values() for epoch in epochs for key in epoch}
    missing = [metric for metric in args.metrics if metric not in recorded]
    if missing:
        raise SystemExit(f"no run records {', '.join(missing)}; recorded: {', '.join(sorted(recorded))}")
    plot(runs, args.metrics, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
