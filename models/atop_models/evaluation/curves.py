"""Training curves: per-epoch metrics of one or more runs against the training hours they had spent, so runs of
different lengths and speeds (a 10-epoch baseline, a 69-epoch one) share one time axis; or, with
`--x schedule`, against the fraction of its planned epochs each run had done, so runs of one recipe at different
lengths line up at the same point of their learning-rate schedule (and runs on machines of different speeds
are not drawn apart by the machine).

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


def planned_epochs(run: Path) -> int:
    """The epochs the run was started for (its config.json, written by atop-train), however many it reached."""
    path = run / "config.json"
    if not path.exists():
        raise SystemExit(f"{run} has no config.json: --x schedule needs the run's planned epochs")
    return json.loads(path.read_text())["config"]["epochs"]


def series(epochs: list[dict], metric: str, planned: int | None = None) -> tuple[list[float], list[float]]:
    """(x at the end of each epoch, the metric's value) for the epochs that record the metric; x is the training
    hours spent so far, or with `planned` the fraction of the planned epochs done."""
    xs, values, spent = [], [], 0.0
    for epoch in epochs:
        spent += epoch["train_seconds"] / 3600
        if metric in epoch:
            xs.append(epoch["epoch"] / planned if planned else spent)
            values.append(epoch[metric])
    return xs, values


X_LABELS = {"hours": "training hours (sum of train_seconds)", "schedule": "fraction of the planned epochs done"}


def plot(runs: dict[str, tuple[list[dict], int | None]], metrics: list[str], out: Path, x: str = "hours") -> None:
    """One panel per metric; `runs` maps a name to (its epochs, its planned epochs or None for the hours axis)."""
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        for name, (epochs, planned) in runs.items():
            xs, values = series(epochs, metric, planned)
            if values:
                axis.plot(xs, values, marker=".", label=name)
        axis.set_title(metric)
        axis.set_xlabel(X_LABELS[x])
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
    parser.add_argument("--x", choices=sorted(X_LABELS), default="hours", help="the horizontal axis")
    args = parser.parse_args(argv)
    runs = {run.name: (read_epochs(run), planned_epochs(run) if args.x == "schedule" else None) for run in args.runs}
    recorded = {key for epochs, _ in runs.values() for epoch in epochs for key in epoch}
    missing = [metric for metric in args.metrics if metric not in recorded]
    if missing:
        raise SystemExit(f"no run records {', '.join(missing)}; recorded: {', '.join(sorted(recorded))}")
    plot(runs, args.metrics, args.out, args.x)
    print(args.out)


if __name__ == "__main__":
    main()
