"""Training curves: per-epoch metrics against the training hours spent (or the schedule done), from real run folders."""

import json

import pytest
from PIL import Image

from atop_models.evaluation.curves import main, planned_epochs, read_epochs, series


def test_hours_accumulate_over_every_epoch_and_unrecorded_epochs_are_left_out(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    epochs = [
        {"epoch": 1, "train_seconds": 1800, "test_accuracy": 0.5},
        {"epoch": 2, "train_seconds": 3600, "test_accuracy": 0.6, "robust_accuracy_pgd10_eot1": 0.3},
        {"epoch": 3, "train_seconds": 1800, "test_accuracy": 0.7, "robust_accuracy_pgd10_eot1": 0.35},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    assert series(read_epochs(run), "test_accuracy") == ([0.5, 1.5, 2.0], [0.5, 0.6, 0.7])
    # Epoch 1 spent its half hour even though it recorded no robust figure.
    assert series(read_epochs(run), "robust_accuracy_pgd10_eot1") == ([1.5, 2.0], [0.3, 0.35])


def test_the_schedule_axis_places_runs_of_different_lengths_by_their_planned_epochs(tmp_path):
    runs = []
    for planned, reached in [(15, 15), (30, 27)]:  # a run that stopped early keeps its planned length
        run = tmp_path / f"run{planned}"
        run.mkdir()
        epochs = [{"epoch": e, "train_seconds": 600, "test_accuracy": e / 100} for e in range(1, reached + 1)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
        (run / "config.json").write_text(json.dumps({"command": "classifier", "config": {"epochs": planned}}))
        runs.append(run)
    short, long = (series(read_epochs(run), "test_accuracy", planned_epochs(run)) for run in runs)
    assert short[0][7] == pytest.approx(8 / 15) and long[0][15] == pytest.approx(16 / 30)
    assert long[0][-1] == pytest.approx(0.9)  # 27 of 30, not stretched to the end
    out = tmp_path / "curves.png"
    main([*map(str, runs), "--metrics", "test_accuracy", "--x", "schedule", "--out", str(out)])
    assert Image.open(out).size[0] > 0
    (runs[0] / "config.json").unlink()
    with pytest.raises(SystemExit, match=r"has no config\.json"):
        main([*map(str, runs), "--metrics", "test_accuracy", "--x", "schedule", "--out", str(out)])


def test_plots_a_real_run_and_names_what_the_runs_record(trained_classifier, tmp_path, capsys):
    out = tmp_path / "curves.png"
    main([str(trained_classifier), "--metrics", "test_accuracy", "train_loss", "--out", str(out)])
    assert Image.open(out).size[0] > 2 * Image.open(out).size[1]  # two panels side by side
    with pytest.raises(SystemExit, match=r"no run records robust_accuracy_pgd10_eot1; recorded: .*test_accuracy"):
        main([str(trained_classifier), "--metrics", "robust_accuracy_pgd10_eot1", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"has no metrics\.jsonl"):
        main([str(tmp_path), "--metrics", "test_accuracy", "--out", str(out)])
