"""Writing a model repository in Triton's layout: <repo>/<model>/config.pbtxt, labels.txt and <version>/model.onnx."""

from __future__ import annotations

import json
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


def write_model(
    repository: Path,
    name: str,
    version: int,
    model: onnx.ModelProto,
    labels: list[str],
    max_batch_size: int,
    gpu: bool,
) -> Path:
    """Write one model; returns the path of its model.onnx."""
    model_dir = repository / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    labelled = {o.name for o in model.graph.output if o.type.tensor_type.shape.dim[-1].dim_value == len(labels)}
    inputs, outputs = tensors(list(model.graph.input), set()), tensors(list(model.graph.output), labelled)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(name, inputs, outputs, max_batch_size, gpu))
    (model_dir / "labels.txt").write_text("\n".join(labels) + "\n")
    path = model_dir / str(version) / "model.onnx"
    onnx.save(model, str(path))
    return path


def write_report(repository: Path, name: str, report: dict) -> None:
    (repository / name / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
