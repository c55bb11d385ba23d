"""A training run's folder: what was asked (config.json), what happened (metrics.jsonl) and how to continue."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from atop_models.runtime import Runtime


class RunDir:
    """A run's folder: config.json (what was asked), metrics.jsonl (one line per epoch), state.safetensors
    (everything needed to resume), and the model artifacts. Only rank 0 writes."""

    def __init__(self, path: str | Path, runtime: Runtime) -> None:
        self.path = Path(path)
        self.runtime = runtime
        self.state_path = self.path / "state.safetensors"
        self.metrics_path = self.path / "metrics.jsonl"

    def start(self, command: str, config: Any, restart: bool) -> bool:
        """Record the config; returns whether to resume. A run folder only resumes the same config."""
        record = {"command": command, "config": dataclasses.asdict(config)}
        config_path = self.path / "config.json"
        resume = self.state_path.exists() and not restart
        if resume:
            previous = json.loads(config_path.read_text())
            if json.loads(json.dumps(record)) != previous:
                raise SystemExit(
                    f"{self.path} holds a run with another config; pass --restart to overwrite it or use another --out"
                )
        if self.runtime.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            if not resume:
                self.metrics_path.unlink(missing_ok=True)
                self.state_path.unlink(missing_ok=True)
            config_path.write_text(json.dumps(record, indent=2) + "\n")
        self.runtime.barrier()
        return resume

    def log(self, metrics: dict[str, Any]) -> None:
        if self.runtime.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
