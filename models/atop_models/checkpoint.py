"""Checkpoints without pickle: tensors in safetensors, everything else in JSON beside them.

  python -m atop_models.checkpoint half SOURCE TARGET        # a copy with fp16 weights (store_rounded)
  python -m atop_models.checkpoint int8 SOURCE TARGET        # a copy with int8 conv/linear weights (store_rounded)
  python -m atop_models.checkpoint ensemble OUT MEMBER ...    # one classifier of several (save_combined)
  python -m atop_models.checkpoint mixture OUT ROBUST ACCURATE --weight W [--sharpness S]   # (save_combined)
  python -m atop_models.checkpoint member SOURCE INDEX TARGET    # one member of either, as stored (save_member)

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
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from atop_models.classifiers import CLASSIFIERS
from atop_models.discriminator import DISCRIMINATORS
from atop_models.purifiers import PURIFIERS

FORMAT = "atop-checkpoint/1"
StoredDtype = Literal["float16", "int8"]
# An int8 checkpoint stores every conv and linear weight of at least this many values as int8 with one fp32
# scale per output channel (symmetric, 127 steps each way), under `<name>` and `<name>` + INT8_SCALE; the rest
# (smaller weights, BatchNorm) in fp16: they are a few percent of the bytes. The limit is the exporter's
# (FOLD_INPUT_LIMIT), so that the served graph keeps exactly these weights in int8.
INT8_MIN_VALUES = 8192
INT8_SCALE = ".int8_scale"
_BUILDERS = {"classifier": CLASSIFIERS, "purifier": PURIFIERS, "discriminator": DISCRIMINATORS}
_BUILT_FROM = ("format", "kind", "arch", "arch_kwargs", "weights_sha256")  # what _save_tensors writes anew


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
    return _save_tensors(stem, model.state_dict(), kind, arch, arch_kwargs, **meta)


def _save_tensors(
    stem: str | Path, tensors: dict[str, torch.Tensor], kind: str, arch: str, arch_kwargs: dict, **meta: Any
) -> Path:
    if kind not in _BUILDERS:
        raise ValueError(f"kind must be one of {sorted(_BUILDERS)}, got {kind!r}")
    weights, config = paths(stem)
    weights.parent.mkdir(parents=True, exist_ok=True)
    _write_tensors(weights, tensors)
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
    model = _BUILDERS[kind].create(record["arch"], **record["arch_kwargs"])
    tensors = _checked_tensors(stem, record, map_location)
    if record.get("weights_dtype") == "int8":
        tensors = {name: tensor for name, tensor in tensors.items() if not name.endswith(INT8_SCALE)} | {
            name: dequantize_int8(q, scale) for name, (q, scale) in int8_weights(tensors).items()
        }
    model.load_state_dict(tensors)
    return model, record


def _checked_tensors(stem: str | Path, record: dict, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores, as stored, once its weights file matches the sha256 its record holds."""
    weights, _ = paths(stem)
    if sha256_file(weights) != record["weights_sha256"]:
        raise ValueError(f"{weights} does not match the sha256 in its config: corrupted or replaced")
    return load_file(str(weights), device=str(device))


def int8_weights(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{weight name: (its int8 values, its per-output-channel fp32 scales)} of an int8 checkpoint's tensors."""
    return {
        name[: -len(INT8_SCALE)]: (tensors[name[: -len(INT8_SCALE)]], scale)
        for name, scale in tensors.items()
        if name.endswith(INT8_SCALE)
    }


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: the largest magnitude of each channel maps to 127."""
    scale = weight.detach().abs().flatten(1).amax(1).float().clamp_min(torch.finfo(torch.float32).tiny) / 127
    return (weight.detach().float() / _per_channel(scale, weight)).round().clamp(-127, 127).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight an int8 checkpoint holds: exactly what the served graph computes from it (Cast, Mul)."""
    return q.float() * _per_channel(scale, q)


def _per_channel(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scale.view(-1, *[1] * (like.dim() - 1))


def store_rounded(source: str | Path, target: str | Path, dtype: StoredDtype) -> Path:
    """Copy a model checkpoint with its floating-point tensors stored in fewer bytes, for the shipped models' size
    budget: "float16" (half the bytes) or "int8" (conv and linear weights in int8 with per-channel scales, the
    rest in fp16: about a quarter). A model loaded from the copy computes in fp32 on the rounded weights, so its
    figures are measured on the copy; its record keeps the source's sha256 (`rounded_from`)."""
    model, record = load_model(source, read_config(source)["kind"])  # checks the source's sha256
    meta = {key: value for key, value in record.items() if key not in _BUILT_FROM}
    meta |= {"weights_dtype": dtype, "rounded_from": record["weights_sha256"]}
    if dtype not in ("float16", "int8"):
        raise ValueError(f"dtype must be 'float16' or 'int8', got {dtype!r}")
    int8: dict[str, torch.Tensor] = {}
    for name, layer in model.named_modules() if dtype == "int8" else ():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.weight.numel() >= INT8_MIN_VALUES:
            int8[f"{name}.weight"], int8[f"{name}.weight{INT8_SCALE}"] = quantize_int8(layer.weight)
    # Module.half() rounds the floating-point parameters and buffers and leaves integer buffers as they are.
    tensors = model.half().state_dict() | int8
    return _save_tensors(target, tensors, record["kind"], record["arch"], record["arch_kwargs"], **meta)


def save_combined(out: str | Path, arch: str, members: list[str | Path], **settings: float) -> Path:
    """One classifier checkpoint of trained classifier checkpoints of the same classes and image size: arch
    "ensemble" (the mean of the members' logits) or "mixture" (robust, accurate; `settings` weight and
    sharpness). Its record keeps each member's (sha256 included)."""
    loaded = [load_model(member, "classifier") for member in members]
    records = [record for _, record in loaded]
    for key in ("classes", "image_size"):
        if any(record[key] != records[0][key] for record in records):
            raise ValueError(f"the members' {key} differ: {[record[key] for record in records]}")
    kwargs = {
        "members": [{"arch": r["arch"], "arch_kwargs": r["arch_kwargs"]} for r in records],
        "num_classes": len(records[0]["classes"]),
        **settings,
    }
    model = CLASSIFIERS.create(arch, **kwargs)
    for member, (trained, _) in zip(model.members, loaded, strict=True):
        member.load_state_dict(trained.state_dict())
    members_records = [{"path": str(path), **record} for path, record in zip(members, records, strict=True)]
    meta = {"classes": records[0]["classes"], "image_size": records[0]["image_size"], "members": members_records}
    return save_model(out, model, "classifier", arch, kwargs, **meta)


def save_member(source: str | Path, index: int, target: str | Path) -> Path:
    """Member `index` of a combined classifier checkpoint (ensemble or mixture) as a checkpoint of its own: its
    tensors copied as the combined one stores them (an int8 copy stays int8), its record the member's own as the
    combined record kept it, plus where it came from (`member_of`). How a user serves a mixture's robust member
    alone from the shipped files."""
    record = read_config(source)
    if record["kind"] != "classifier" or record["arch"] not in ("ensemble", "mixture"):
        raise ValueError(f"{paths(source)[1]} holds a {record['arch']} {record['kind']}, not an ensemble or a mixture")
    if not 0 <= index < len(record["members"]):
        raise ValueError(f"member {index} asked for; {paths(source)[1]} has {len(record['members'])} (from 0)")
    prefix = f"members.{index}."
    stored = _checked_tensors(source, record)
    tensors = {name[len(prefix) :]: tensor for name, tensor in stored.items() if name.startswith(prefix)}
    member = record["members"][index]
    meta = {key: value for key, value in member.items() if key not in ("path", "weights_dtype", *_BUILT_FROM)}
    meta |= {key: record[key] for key in ("weights_dtype",) if key in record}  # how the tensors are stored now
    meta["member_of"] = {"weights_sha256": record["weights_sha256"], "index": index, "arch": record["arch"]}
    return _save_tensors(target, tensors, "classifier", member["arch"], member["arch_kwargs"], **meta)


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
    for dtype, help_text in (("half", "its weights stored in fp16"), ("int8", "its conv/linear weights in int8")):
        rounded = commands.add_parser(dtype, help=f"copy a model checkpoint with {help_text}")
        rounded.add_argument("source", help="checkpoint stem (or its .safetensors / .json)")
        rounded.add_argument("target", help="the copy's stem")
    ensemble = commands.add_parser("ensemble", help="one classifier checkpoint from trained classifiers")
    ensemble.add_argument("out", help="the ensemble's checkpoint stem")
    ensemble.add_argument("members", nargs="+", help="the members' checkpoint stems")
    mixture = commands.add_parser("mixture", help="one classifier mixing a robust and an accurate classifier")
    mixture.add_argument("out", help="the mixture's checkpoint stem")
    mixture.add_argument("robust", help="the robust member's checkpoint stem")
    mixture.add_argument("accurate", help="the accurate member's checkpoint stem")
    mixture.add_argument("--weight", type=float, required=True, help="the robust member's share, in (0, 1)")
    mixture.add_argument("--sharpness", type=float, default=1.0, help="scale of the robust member's logits")
    member = commands.add_parser("member", help="one member of an ensemble or mixture as its own checkpoint")
    member.add_argument("source", help="the ensemble's or mixture's checkpoint stem")
    member.add_argument("index", type=int, help="which member, from 0 (a mixture's robust member is 0)")
    member.add_argument("target", help="the member's checkpoint stem")
    args = parser.parse_args(argv)
    if args.command in ("half", "int8"):
        dtype: StoredDtype = "float16" if args.command == "half" else "int8"
        weights, source = store_rounded(args.source, args.target, dtype), paths(args.source)[0]
        print(f"{weights}: {weights.stat().st_size / 2**20:.2f} MiB (from {source.stat().st_size / 2**20:.2f})")
    elif args.command == "ensemble":
        print(save_combined(args.out, "ensemble", args.members))
    elif args.command == "member":
        print(save_member(args.source, args.index, args.target))
    else:
        members = [args.robust, args.accurate]
        print(save_combined(args.out, "mixture", members, weight=args.weight, sharpness=args.sharpness))


if __name__ == "__main__":
    main()
