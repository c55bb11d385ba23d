"""A training run's folder: what was asked (config.json), what happened (metrics.jsonl) and how to continue."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from atop_models.checkpoint import save_state
from atop_models.runtime import Runtime


class RunDir:
    """A run's folder: config.json (what was asked), metrics.jsonl (one line per epoch), state.safetensors
    (everything needed to go on from the last epoch kept), progress.safetensors (the same, part-way through the
    epoch after it, while one runs), and the model artifacts. Only rank 0 writes."""

    def __init__(self, path: str | Path, runtime: Runtime) -> None:
        self.path = Path(path)
        self.runtime = runtime
        self.state_path = self.path / "state.safetensors"
        self.progress_path = self.path / "progress.safetensors"
        self.metrics_path = self.path / "metrics.jsonl"
        self.varying: dict[str, Any] = {}  # set by start(): the config values each metrics line names

    def resume_path(self) -> Path:
        """The newest state to resume from: the epoch in progress when there is one, else the last kept epoch."""
        return self.progress_path if self.progress_path.exists() else self.state_path

    def halted(self) -> bool:
        """Whether the divergence guard stopped this run: its last logged epoch carries the reason."""
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
        return bool(lines) and "halted" in json.loads(lines[-1])

    def start(self, command: str, config: Any, restart: bool) -> bool:
        """Record the config; returns whether to resume. A run folder only resumes the same config, except
        that a halted run may go on from its last kept epoch with another seed or training attack strength
        (`MAY_CHANGE_AFTER_HALT`); each epoch's metrics line names the values it ran with."""
        record = {"command": command, "config": _as_json(config)}
        config_path = self.path / "config.json"
        resume = self.resume_path().exists() and not restart
        if resume:
            # A run started before a setting existed ran with what is now its default (a new setting's default
            # is the old behaviour), so its config.json reads as holding the default.
            previous, halted = json.loads(config_path.read_text()), self.halted()
            previous["config"] = _with_defaults(previous["config"], _as_json(type(config)()))
            if record != previous and not (halted and _fixed_part(record) == _fixed_part(previous)):
                raise SystemExit(
                    f"{self.path} holds a run with another config; pass --restart to overwrite it or use another --out"
                    + (f"; a halted run may only change {', '.join(_flags())}" if halted else "")
                )
        self.varying = _varying_part(record)
        if self.runtime.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            if not resume:
                for path in (self.metrics_path, self.state_path, self.progress_path):
                    path.unlink(missing_ok=True)
            config_path.write_text(json.dumps(record, indent=2) + "\n")
        self.runtime.barrier()
        return resume

    def save(self, state: dict[str, Any]) -> None:
        """Rank 0's resumable state: at a kept epoch's end (batch 0) to the state file, the progress file then
        dropped; part-way through an epoch to the progress file."""
        if state["batch"]:
            save_state(self.progress_path, state)
        else:
            save_state(self.state_path, state)
            self.drop_progress()

    def drop_progress(self) -> None:
        """Forget the epoch in progress (kept, or halted: not a place to go on from); rank 0 calls it."""
        self.progress_path.unlink(missing_ok=True)

    def log(self, metrics: dict[str, Any]) -> None:
        """Append an epoch's metrics, with the values of the settings a halted run may have changed since."""
        if self.runtime.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(metrics | self.varying) + "\n")


# What a halted run may change when it goes on from its last kept epoch (docs/design.md, "Training that
# diverges"): the seed (another data order and other attack draws) and the training attack's strength (PGD with
# more steps: catastrophic overfitting is a failure of weak attacks). Paths into the config; not every command's
# config has all of them.
MAY_CHANGE_AFTER_HALT = (("seed",), ("adv", "steps"), ("adv", "step_size"))


def _flags() -> list[str]:
    return ["--" + "-".join(path).replace("_", "-") for path in MAY_CHANGE_AFTER_HALT]


def _holder(config: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    """The dict in the config that holds path's last key, or None where the config has no such path."""
    node: Any = config
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) and path[-1] in node else None


def _varying_part(record: dict[str, Any]) -> dict[str, Any]:
    """{"seed": 2, "adv_steps": 3, ...}: the config's values at MAY_CHANGE_AFTER_HALT's paths that it has."""
    varying = {}
    for path in MAY_CHANGE_AFTER_HALT:
        holder = _holder(record["config"], path)
        if holder is not None and holder[path[-1]] is not None:
            varying["_".join(path)] = holder[path[-1]]
    return varying


def _as_json(config: Any) -> dict[str, Any]:
    """A config dataclass as config.json holds it (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _with_defaults(config: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`config` with every setting it lacks (at any depth) taken from `defaults`."""
    filled = dict(config)
    for key, default in defaults.items():
        if key not in filled:
            filled[key] = default
        elif isinstance(default, dict) and isinstance(filled[key], dict):
            filled[key] = _with_defaults(filled[key], default)
    return filled


def _fixed_part(record: dict[str, Any]) -> dict[str, Any]:
    """The record with the values a halted run may change blanked out."""
    fixed = json.loads(json.dumps(record))
    for path in MAY_CHANGE_AFTER_HALT:
        holder = _holder(fixed["config"], path)
        if holder is not None:
            holder[path[-1]] = None
    return fixed
