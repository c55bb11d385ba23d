"""DDP: `torchrun --nproc-per-node 2` on the CPU with the gloo backend, as a multi-GPU job would run."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def torchrun(*args: str) -> None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "atop_models.train.cli",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes share the 2 cores
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


def last_metrics(run) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def test_two_process_ddp_training(synthetic_folder, tmp_path):
    data = [
        "--data-source",
        str(synthetic_folder),
        "--data-cache-dir",
        str(tmp_path / "cache"),
        "--data-eval-images",
        "0",
        "--epochs",
        "2",
    ]
    torchrun(
        "classifier",
        "--out",
        str(tmp_path / "cls"),
        *data,
        "--batch-size",
        "32",
        "--arch-kwargs",
        '{"widths": [16, 32, 32]}',
        "--lr",
        "0.4",
        "--lookahead-every",  # 8 steps in all: Lookahead's cubic ramp is made for hundreds; this test is DDP's
        "0",
    )
    metrics = last_metrics(tmp_path / "cls")
    assert metrics["world_size"] == 2
    assert metrics["steps_per_epoch"] == 256 // 2 // 32  # each rank takes half of the data
    # Gradients averaged across the ranks: each rank trained on its own half of the data, with its own random
    # stream, yet both hold the very same weights and optimiser state (ranks training apart would differ).
    assert metrics["ranks_state_spread"] == 0.0
    assert metrics["test_accuracy"] >= 0.75

    torchrun(
        "pretrain",
        "--out",
        str(tmp_path / "pre"),
        *data,
        "--data-train-images",
        "64",
        "--batch-size",
        "16",
        "--cnum",
        "8",
        "--disc-cnum",
        "8",
        "--disc-layers",
        "3",
        "--classifier",
        str(tmp_path / "cls" / "classifier"),
    )
    metrics = last_metrics(tmp_path / "pre")
    assert metrics["world_size"] == 2 and metrics["steps_per_epoch"] == 2
    assert metrics["ranks_state_spread"] == 0.0  # the purifier and its discriminator stay in sync too
    assert (tmp_path / "pre" / "purifier.safetensors").exists()
