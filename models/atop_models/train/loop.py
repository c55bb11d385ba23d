"""The one epoch loop every training command shares: steps, progress, metrics, checkpoints, resume.

A task (classifier, pretrain, finetune) supplies `train_step`, `end_epoch` (evaluate, save artifacts; rank 0)
and `state_dict` / `load_state_dict` (everything needed to continue). The loop saves the whole state every
`checkpoint_minutes` (to the run's progress file) and at each kept epoch's end (to its state file, the progress
file then dropped), so an interrupted run resumes mid-epoch, at the batch it reached: the loader's order depends
only on (seed, epoch), and the RNG is reseeded from the position. An epoch the task halts is dropped whole,
progress included, so the folder goes on from the last kept epoch (with another seed or a stronger training attack:
docs/design.md, "Training that diverges"). The state also carries the seconds the epoch had run, so
`train_seconds` is the whole epoch's cost across resumes (the model card's CPU-hours ledger sums it, halted
epochs included: they were spent).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch
from tqdm import tqdm

from atop_models.checkpoint import load_state
from atop_models.data import BatchLoader
from atop_models.runtime import Runtime, seed_everything
from atop_models.train.run_dir import RunDir


class TrainingHalted(Exception):
    """A task stopped the run at an epoch's end: that epoch's metrics are logged (with the reason under "halted"),
    neither its end nor its progress is kept, so the run folder resumes from the last kept epoch's end."""

    def __init__(self, message: str, kept_epochs: int) -> None:
        super().__init__(message)
        self.kept_epochs = kept_epochs


class Task(Protocol):
    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> dict[str, float]: ...
    def end_epoch(self, epoch: int) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# BatchNorm's running statistics are updated by each rank from its own batch (DDP broadcasts rank 0's before the
# next forward), so they are left out of the comparison of the ranks' states.
_PER_RANK_BUFFERS = ("running_mean", "running_var")


def weights_fingerprint(state: Any) -> float:
    """The sum of every floating-point tensor in a (nested) state: weights and optimiser moments. Ranks that
    average their gradients (DDP) hold identical states, so their fingerprints agree to the last bit."""
    if isinstance(state, torch.Tensor):
        return float(state.detach().double().sum()) if state.is_floating_point() else 0.0
    if isinstance(state, dict):
        return sum(
            weights_fingerprint(value)
            for key, value in state.items()
            if not (isinstance(key, str) and key.endswith(_PER_RANK_BUFFERS))
        )
    if isinstance(state, list | tuple):
        return sum(weights_fingerprint(value) for value in state)
    return 0.0


def _reseed(seed: int, runtime: Runtime, epoch: int, batch: int) -> None:
    """Distinct streams per rank, reproducible per position (so a resumed run draws like a fresh one)."""
    seed_everything(seed * 1_000_003 + runtime.rank * 7_919 + epoch * 104_729 + batch)


def fit(
    task: Task,
    loader: BatchLoader,
    run: RunDir,
    runtime: Runtime,
    epochs: int,
    seed: int,
    checkpoint_minutes: float,
    resume: bool,
) -> list[dict[str, Any]]:
    start_epoch, start_batch, sums, seconds_before = 0, 0, {}, 0.0
    if resume:
        state = load_state(run.resume_path())
        task.load_state_dict(state["task"])
        start_epoch, start_batch, sums = state["epoch"], state["batch"], state["sums"]
        seconds_before = state.get("seconds", 0.0)  # states written before it was recorded lack it

    def save(epoch: int, batch: int, sums: dict[str, float], seconds: float) -> None:
        if runtime.is_main:
            run.save({"task": task.state_dict(), "epoch": epoch, "batch": batch, "sums": sums, "seconds": seconds})

    history = []
    last_save = time.monotonic()
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        _reseed(seed, runtime, epoch, start_batch)
        started = time.monotonic() - seconds_before  # a resumed epoch keeps the seconds it ran before
        bar = tqdm(
            total=len(loader),
            initial=start_batch,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not runtime.is_main,
        )
        for batch, (x, y) in enumerate(loader):
            if batch < start_batch:
                continue  # resuming mid-epoch: the same order, already-done batches skipped
            for key, value in task.train_step(x, y, epoch).items():
                sums[key] = sums.get(key, 0.0) + value
            bar.update()
            bar.set_postfix({k: f"{v / (batch + 1):.4f}" for k, v in list(sums.items())[:3]})
            if time.monotonic() - last_save > checkpoint_minutes * 60:
                save(epoch, batch + 1, sums, time.monotonic() - started)
                last_save = time.monotonic()
        bar.close()
        seconds = time.monotonic() - started
        images = len(loader) * loader.config.batch_size * runtime.world_size
        metrics = {
            "epoch": epoch + 1,
            **runtime.mean({f"train_{k}": v / len(loader) for k, v in sums.items()}),
            "train_seconds": round(seconds, 2),
            "train_images_per_second": round(images / max(seconds, 1e-9), 1),
            "world_size": runtime.world_size,
            "steps_per_epoch": len(loader),
            # 0 when the ranks hold the same state, as they must; anything else means they trained apart.
            "ranks_state_spread": runtime.spread(weights_fingerprint(task.state_dict())),
        }
        metrics.update(task.end_epoch(epoch))
        runtime.barrier()
        run.log(metrics)
        if runtime.mean({"halted": float("halted" in metrics)})["halted"]:  # every rank stops, not only rank 0
            if runtime.is_main:
                run.drop_progress()
            raise TrainingHalted(f"epoch {epoch + 1}: {metrics.get('halted', 'halted by rank 0')}", epoch)
        history.append(metrics)
        start_batch, sums, seconds_before = 0, {}, 0.0
        save(epoch + 1, 0, {}, 0.0)
        last_save = time.monotonic()
    return history
