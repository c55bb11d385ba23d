"""Writing a model repository in Triton's layout: <repo>/<model>/config.pbtxt, labels.txt and <version>/model.onnx.

A model is written under a staging name, checked there, and moved to model.onnx only once every check passed."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import onnx

_TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.UINT8: "TYPE_UINT8"}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: int  # onnx.TensorProto element type
    dims: tuple[int, ...]  # without the batch dimension
    labels: bool = False  # Triton's classification extension reads labels.txt for this output


def tensors(values: list[onnx.ValueInfoProto], labelled: set[str]) -> list[Tensor]:
    out = []
    for value in values:
        shape = value.type.tensor_type.shape.dim[1:]  # dimension 0 is the dynamic batch
        dims = tuple(d.dim_value for d in shape)
        out.append(Tensor(value.name, value.type.tensor_type.elem_type, dims, value.name in labelled))
    return out


def config_pbtxt(name: str, inputs: list[Tensor], outputs: list[Tensor], max_batch_size: int, gpu: bool) -> str:
    def block(kind: str, items: list[Tensor]) -> str:
        entries = []
        for t in items:
            label = '\n    label_filename: "labels.txt"' if t.labels else ""
            entries.append(
                f'  {{\n    name: "{t.name}"\n    data_type: {_TRITON_TYPES[t.dtype]}\n'
                f"    dims: [ {', '.join(map(str, t.dims))} ]{label}\n  }}"
            )
        return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"

    return (
        f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch_size}\n'
        + block("input", inputs)
        + block("output", outputs)
        + "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
        + f"instance_group [ {{ count: 1\n  kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]\n"
        # No response cache: outputs are random by design (docs/design.md section 5).
        + "response_cache { enable: false }\n"
    )


STAGED_NAME = "model.onnx.partial"  # the server loads <version>/model.onnx only: a staged model is never served


@contextmanager
def staged_model(repository: Path, name: str, version: int, model: onnx.ModelProto) -> Iterator[Path]:
    """Write `model` under a name the server does not load and yield its path, for the checks. A model not
    published by the end of the block (a check failed) is removed, with the folders staging made and left empty."""
    version_dir = repository / name / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    staged = version_dir / STAGED_NAME
    onnx.save(model, str(staged))
    try:
        yield staged
    finally:
        if staged.exists():
            staged.unlink()
            for folder in (version_dir, version_dir.parent):
                if not any(folder.iterdir()):
                    folder.rmdir()


def publish_model(staged: Path, model: onnx.ModelProto, labels: list[str], max_batch_size: int, gpu: bool) -> Path:
    """Write config.pbtxt and labels.txt beside a checked staged model, then move it to model.onnx in one rename;
    returns the path of model.onnx."""
    model_dir = staged.parent.parent
    labelled = {o.name for o in model.graph.output if o.type.tensor_type.shape.dim[-1].dim_value == len(labels)}
    inputs, outputs = tensors(list(model.graph.input), set()), tensors(list(model.graph.output), labelled)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(model_dir.name, inputs, outputs, max_batch_size, gpu))
    (model_dir / "labels.txt").write_text("\n".join(labels) + "\n")
    path = staged.with_name("model.onnx")
    os.replace(staged, path)
    return path


def write_report(repository: Path, name: str, report: dict) -> None:
    (repository / name / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
