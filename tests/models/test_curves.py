"""Training curves: per-epoch metrics against the training hours spent, from real run folders."""

import json

import pytest
from PIL import Image

from atop_models.evaluation.curves import main, read_epochs, series


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


def test_plots_a_real_run_and_names_what_the_runs_record(trained_classifier, tmp_path, capsys):
    out = tmp_path / "curves.png"
    main([str(trained_classifier), "--metrics", "test_accuracy", "train_loss", "--out", str(out)])
    assert Image.open(out).size[0] > 2 * Image.open(out).size[1]  # two panels side by side
    with pytest.raises(SystemExit, match=r"no run records robust_accuracy_pgd10_eot1; recorded: .*test_accuracy"):
        main([str(trained_classifier), "--metrics", "robust_accuracy_pgd10_eot1", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"has no metrics\.jsonl"):
        main([str(tmp_path), "--metrics", "test_accuracy", "--out", str(out)])
