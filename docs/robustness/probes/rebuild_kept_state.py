"""Rebuild the resumable state at the end of a halted classifier run's last kept epoch, for a run folder
written before the trainer kept that state itself (2026-12-04: until then a halted epoch's mid-epoch
checkpoints overwrote it). The 30-epoch PGD-2 run halted in epoch 27 with only epoch 26's classifier left.

From the kept classifier: its weights (BatchNorm statistics included), the scheduler advanced to the kept
epoch's last step, the Lookahead average set to the weights (the real one last synced up to 4 steps before the
epoch's end, so it lags them by at most that), the divergence guard's best clean accuracy read from the run's
metrics. Not recoverable: the optimizer's momentum, which starts at zero (at momentum 0.85 it is rebuilt within
~10 of the 97 steps of an epoch). The result goes to a new folder beside the run's config and metrics, which
`atop-train classifier --out NEW ... --seed S` then resumes from with another seed (as a halted run may).

Usage: python docs/robustness/probes/rebuild_kept_state.py RUN NEW"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from atop_models.checkpoint import load_model, save_state
from atop_models.evaluation.curves import read_epochs
from atop_models.runtime import setup_runtime
from atop_models.train import classifier
from atop_models.train.adversarial import AdversarialConfig
from atop_models.train.common import DataConfig


def main() -> None:
    run, new = Path(sys.argv[1]), Path(sys.argv[2])
    recorded = json.loads((run / "config.json").read_text())["config"]
    config = classifier.ClassifierConfig(
        **{**recorded, "data": DataConfig(**recorded["data"]), "adv": AdversarialConfig(**recorded["adv"])}
    )
    epochs = read_epochs(run)
    kept, meta = load_model(run / "classifier", "classifier")
    kept_epoch = meta["metrics"]["epoch"]
    assert "halted" in epochs[-1] and epochs[-1]["epoch"] == kept_epoch + 1, "not a run halted after its kept epoch"

    new.mkdir(parents=True, exist_ok=False)
    for name in ("config.json", "metrics.jsonl", "classifier.json", "classifier.safetensors"):
        shutil.copy2(run / name, new / name)
    task, loader = classifier.build(config, setup_runtime("cpu"), new)
    task.model.load_state_dict(kept.state_dict())
    for _ in range(kept_epoch * len(loader)):
        task.scheduler.step()  # LambdaLR warns that no optimizer step came first: none should, here
    task.lookahead = classifier.Lookahead(task.model)
    task.guard.best = max(e["test_accuracy"] for e in epochs if "halted" not in e)
    state = {"task": task.state_dict(), "epoch": kept_epoch, "batch": 0, "sums": {}, "seconds": 0.0}
    save_state(new / "state.safetensors", state)
    print(f"{new}: epoch {kept_epoch} kept, lr {task.scheduler.get_last_lr()[-1]:.4f}, best {task.guard.best:.3f}")


if __name__ == "__main__":
    main()
