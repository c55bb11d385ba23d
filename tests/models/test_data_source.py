"""The default --data-source works on any machine (a torchvision download); the recipe passes the local archive."""

import re
import subprocess
from pathlib import Path

import pytest

from atop_models.data import DEFAULT_SOURCE, DOWNLOADABLE
from atop_models.evaluation.clean import main as clean_main
from atop_models.evaluation.cli import main as eval_main
from atop_models.train.cli import main as train_main

REPO = Path(__file__).resolve().parents[2]
ARCHIVE = "../shared/datasets/cifar10-jpg.tar.gz"


@pytest.mark.parametrize(
    "main,argv",
    [
        (train_main, ["classifier", "--help"]),
        (train_main, ["pipeline", "--help"]),
        (eval_main, ["--help"]),
        (clean_main, ["--help"]),
    ],
)
def test_every_command_that_reads_data_defaults_to_a_download(main, argv, capsys):
    assert DEFAULT_SOURCE in DOWNLOADABLE
    with pytest.raises(SystemExit) as done:
        main(argv)
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert done.value.code == 0
    assert re.search(r"--data-source DATA_SOURCE .*\(default: cifar10\)", help_text)


def test_the_default_recipe_trains_every_stage_on_the_local_archive():
    dry_run = subprocess.run(["make", "-n", "train-default"], cwd=REPO, capture_output=True, text=True, check=True)
    commands = dry_run.stdout.replace("\\\n", " ").splitlines()  # make -n keeps the recipe's continued lines
    stages = [line for line in commands if "atop-train " in line]
    assert len(stages) == 11
    assert all(f"--data-source {ARCHIVE}" in stage for stage in stages)
    # then the served files: the three adversarially trained classifiers as one, mixed with the first stage's
    # (trained on clean images) at the robust share v11 serves, stored in int8, and the purifier stored in fp16
    steps = [line.split("atop_models.checkpoint ")[1] for line in commands if "checkpoint " in line]
    assert [step.split()[0] for step in steps] == ["ensemble", "mixture", "int8", "half"]
    mixture = steps[1].split()
    assert mixture[3] == "runs/default/classifier/classifier" and mixture[-2:] == ["--weight", "0.875"]
