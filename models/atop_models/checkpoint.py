"""Checkpoints without pickle: tensors in safetensors, everything else in JSON beside them.

  python -m atop_models.checkpoint half SOURCE TARGET        # a copy with fp16 weights (store_half)
  python -m atop_models.checkpoint ensemble OUT MEMBER ...    # one classifier of several (save_ensemble)

A model checkpoint is ``<stem>.safetensors`` (the weights) + ``<stem>.json`` (what to build and how it was
trained). A training state (optimizers, schedulers, RNG states, counters) is one safetensors file: its nested
structure is flattened, tensors stored under their path, the rest as JSON in the file's metadata. Every
write is atomic (temp file + rename), so an interrupted run never leaves a half-written state behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from atop_models.classifiers import CLASSIFIERS
from atop_models.discriminator import DISCRIMINATORS
from atop_models.purifiers import PURIFIERS

FORMAT = "atop-checkpoint/1"
_BUILDERS = {"classifier": CLASSIFIERS, "purifier": PURIFIERS, "discriminator": DISCRIMINATORS}


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def paths(stem: str | Path) -> tuple[Path, Path]:
    """A checkpoint is named by its stem; either file's path is accepted too."""
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_model(stem: str | Path, model: nn.Module, kind: str, arch: str, arch_kwargs: dict, **meta: Any) -> Path:
    """Save weights + a JSON config that says how to rebuild the model (kind, arch, kwargs) and its recipe."""
    if kind not in _BUILDERS:
        raise ValueError(f"kind must be one of {sorted(_BUILDERS)}, got {kind!r}")
    weights, config = paths(stem)
    weights.parent.mkdir(parents=True, exist_ok=True)
    _write_tensors(weights, model.state_dict())
    record = {"format": FORMAT, "kind": kind, "arch": arch, "arch_kwargs": arch_kwargs, **meta}
    record["weights_sha256"] = sha256_file(weights)
    _write_json(config, record)
    return weights


def read_config(stem: str | Path) -> dict:
    _, config = paths(stem)
    if not config.exists():
        raise FileNotFoundError(f"checkpoint config {config} does not exist")
    record = json.loads(config.read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{config} is not an {FORMAT} checkpoint (format={record.get('format')!r})")
    return record


def load_model(stem: str | Path, kind: str, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model named in the JSON config and load its weights (strict). Returns (model, config)."""
    record = read_config(stem)
    if record["kind"] != kind:
        raise ValueError(f"{paths(stem)[1]} holds a {record['kind']}, not a {kind}")
    weights, _ = paths(stem)
    if sha256_file(weights) != record["weights_sha256"]:
        raise ValueError(f"{weights} does not match the sha256 in its config: corrupted or replaced")
    model = _BUILDERS[kind].create(record["arch"], **record["arch_kwargs"])
    model.load_state_dict(load_file(str(weights), device=str(map_location)))
    return model, record


def store_half(source: str | Path, target: str | Path) -> Path:
    """Copy a model checkpoint with its floating-point tensors stored in fp16 (integer buffers as they are): half
    the bytes, for the shipped models' size budget. A model loaded from the copy computes in fp32 on the rounded
    weights, so its figures are measured on the copy; its record keeps the source's sha256 (`rounded_from`)."""
    model, record = load_model(source, read_config(source)["kind"])  # checks the source's sha256
    built_from = ("format", "kind", "arch", "arch_kwargs", "weights_sha256")  # save_model writes these anew
    meta = {key: value for key, value in record.items() if key not in built_from}
    meta |= {"weights_dtype": "float16", "rounded_from": record["weights_sha256"]}
    # Module.half() rounds the floating-point parameters and buffers and leaves integer buffers as they are.
    return save_model(target, model.half(), record["kind"], record["arch"], record["arch_kwargs"], **meta)


def save_ensemble(out: str | Path, members: list[str | Path]) -> Path:
    """One classifier checkpoint (arch "ensemble": the mean of the members' logits) holding `members`, trained
    classifier checkpoints of the same classes and image size; its record keeps each member's (sha256 included)."""
    loaded = [load_model(member, "classifier") for member in members]
    records = [record for _, record in loaded]
    for key in ("classes", "image_size"):
        if any(record[key] != records[0][key] for record in records):
            raise ValueError(f"the members' {key} differ: {[record[key] for record in records]}")
    kwargs = {
        "members": [{"arch": r["arch"], "arch_kwargs": r["arch_kwargs"]} for r in records],
        "num_classes": len(records[0]["classes"]),
    }
    model = CLASSIFIERS.create("ensemble", **kwargs)
    for member, (trained, _) in zip(model.members, loaded, strict=True):
        member.load_state_dict(trained.state_dict())
    members_records = [{"path": str(path), **record} for path, record in zip(members, records, strict=True)]
    meta = {"classes": records[0]["classes"], "image_size": records[0]["image_size"], "members": members_records}
    return save_model(out, model, "classifier", "ensemble", kwargs, **meta)


@dataclass(frozen=True)
class BuiltModel:
    """A model with what rebuilds it (its architecture's registry name and constructor arguments); one loaded
    from a checkpoint also carries that checkpoint's record and path."""

    model: nn.Module
    arch: str
    arch_kwargs: dict
    record: dict = field(default_factory=dict)
    path: str = ""

    def save(self, stem: str | Path, kind: str, **meta: Any) -> Path:
        return save_model(stem, self.model, kind, self.arch, self.arch_kwargs, **meta)


def load_built_model(stem: str | Path, kind: str) -> BuiltModel:
    """`load_model`, with the architecture and the checkpoint's path kept beside the model."""
    model, record = load_model(stem, kind)
    return BuiltModel(model, record["arch"], record["arch_kwargs"], record, str(stem))


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        # JSON keys are strings; optimizer states key their entries by int, so keep keys with their type.
        return {"__dict__": [[k, _flatten(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_state(path: str | Path, state: dict) -> None:
    """Save a nested training state (dicts, lists, tensors, JSON scalars) as ONE safetensors file whose
    metadata holds the JSON structure: a single atomic rename, so a state on disk is always complete."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, "", tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "kind": "train-state", "state": json.dumps(structure)}
    _write_tensors(path, tensors, metadata)


def load_state(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("kind") != "train-state":
            raise ValueError(f"{path} is not a training state")
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return _unflatten(json.loads(metadata["state"]), tensors)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m atop_models.checkpoint", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    half = commands.add_parser("half", help="copy a model checkpoint with its weights stored in fp16")
    half.add_argument("source", help="checkpoint stem (or its .safetensors / .json)")
    half.add_argument("target", help="the copy's stem")
    ensemble = commands.add_parser("ensemble", help="one classifier checkpoint from trained classifiers")
    ensemble.add_argument("out", help="the ensemble's checkpoint stem")
    ensemble.add_argument("members", nargs="+", help="the members' checkpoint stems")
    args = parser.parse_args(argv)
    if args.command == "half":
        weights, source = store_half(args.source, args.target), paths(args.source)[0]
        print(f"{weights}: {weights.stat().st_size / 2**20:.2f} MiB (from {source.stat().st_size / 2**20:.2f})")
    else:
        print(save_ensemble(args.out, args.members))


if __name__ == "__main__":
    main()
