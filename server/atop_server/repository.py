"""Reading a model repository (Triton layout) written by atop-export: <repo>/<model>/<version>/model.onnx.

Everything a server needs comes from the ONNX file itself (its `atop.*` metadata: labels, input layout and
range, RT parameters); a broken repository is reported with the path and what is wrong with it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from atop_server.session import create_session

REQUIRED_METADATA = ("atop.labels", "atop.input")
_LOAD_ERRORS = (
    ort_errors.InvalidProtobuf,
    ort_errors.Fail,
    ort_errors.InvalidGraph,
    ort_errors.NoSuchFile,
    ort_errors.InvalidArgument,
)


class ModelLoadError(RuntimeError):
    """The model exists but cannot be served (a broken file, missing metadata)."""


class ModelNotFoundError(LookupError):
    """No such model or version in the repository."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # onnxruntime's type string, e.g. "tensor(float)"
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    path: Path
    session: ort.InferenceSession
    labels: list[str]
    input_spec: dict[str, Any]  # atop.input: layout, dtype, height, width, value_range
    metadata: dict[str, Any] = field(repr=False)
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()


def list_models(repository: Path) -> dict[str, list[int]]:
    """Model name -> its versions (ascending); folders without a numeric version holding model.onnx are skipped."""
    if not repository.is_dir():
        raise ModelNotFoundError(f"model repository {repository} does not exist")
    models = {}
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
        versions = sorted(int(v.name) for v in model_dir.iterdir() if v.name.isdigit() and (v / "model.onnx").exists())
        if versions:
            models[model_dir.name] = versions
    return models


def load_model(
    repository: Path,
    name: str,
    version: int | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    optimization_level: str = "all",
    intra_op_threads: int = 0,
) -> LoadedModel:
    """Open one model version (the newest when version is None) in a freshly seeded session."""
    versions = list_models(repository).get(name)
    if not versions:
        raise ModelNotFoundError(f"no model {name!r} in {repository}")
    version = versions[-1] if version is None else version
    if version not in versions:
        raise ModelNotFoundError(f"model {name!r} has no version {version} (has {versions})")
    path = repository / name / str(version) / "model.onnx"
    try:
        session = create_session(path, providers, optimization_level, intra_op_threads)
    except _LOAD_ERRORS as error:
        raise ModelLoadError(f"{path} is not a loadable ONNX model (truncated or corrupted?): {error}") from error
    raw = session.get_modelmeta().custom_metadata_map
    missing = [key for key in REQUIRED_METADATA if key not in raw]
    if missing:
        raise ModelLoadError(f"{path} lacks the metadata {missing}: export it with atop-export")
    try:
        metadata = {key: json.loads(value) for key, value in raw.items() if key.startswith("atop.")}
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path} has unreadable atop.* metadata: {error}") from error

    def specs(values: list) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(v.name, v.type, tuple(v.shape)) for v in values)

    return LoadedModel(
        name,
        version,
        path,
        session,
        metadata["atop.labels"],
        metadata["atop.input"],
        metadata,
        specs(session.get_inputs()),
        specs(session.get_outputs()),
    )
