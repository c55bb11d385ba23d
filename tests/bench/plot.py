"""The PNG of make bench: throughput and p99 per load for A, S and C; in-process throughput against batch size,
for the shipped model and for the same small architecture at 32 and 256 px."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: a file only
import matplotlib.pyplot as plt

SYSTEMS = {"A": "A in-process", "S": "S atop-serve", "C": "C Triton"}
COLOURS = {"A": "#7f7f7f", "S": "#1f77b4", "C": "#76b900"}


def _bars(axis: plt.Axes, loads: dict, key: str, ylabel: str) -> None:
    names = list(loads)
    width = 0.27
    for k, system in enumerate(SYSTEMS):
        values = [loads[name].get(system, {}).get(key, 0.0) for name in names]
        positions = [i + (k - 1) * width for i in range(len(names))]
        axis.bar(positions, values, width, label=SYSTEMS[system], color=COLOURS[system])
    axis.set_xticks(range(len(names)), names)
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=8)


def _curves(axis: plt.Axes, curves: dict[str, dict], title: str) -> None:
    for label, sweep in curves.items():
        batches = [int(b) for b in sweep]
        axis.plot(batches, [sweep[b]["images_per_second"] for b in sweep], marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("batch size (images per onnxruntime call)")
    axis.set_ylabel("images / s")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)


def plot(report: dict, path: Path) -> None:
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    loads = report["loads"]
    _bars(axes[0, 0], loads, "images_per_second", "images / s")
    axes[0, 0].set_title("throughput per load (A: in-process at the load's largest batch)", fontsize=10)
    _bars(axes[0, 1], loads, "p99_ms", "p99 latency, ms (A: one call)")
    axes[0, 1].set_yscale("log")
    axes[0, 1].set_title("p99 latency per load", fontsize=10)
    _curves(axes[1, 0], {report["model"]: report["batch_sweep"]}, "in-process throughput against batch size")
    sizes = report.get("image_sizes", {})
    if "sweeps" in sizes:
        _curves(axes[1, 1], sizes["sweeps"], "image size: the small test architecture at 32 and 256 px")
        axes[1, 1].set_yscale("log")
    else:
        axes[1, 1].text(0.5, 0.5, sizes.get("skipped", "image sizes not measured"), ha="center", wrap=True)
        axes[1, 1].set_axis_off()
    figure.suptitle(f"make bench: {report['model']}, {report['machine']['cpu']} x{report['machine']['cores']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
