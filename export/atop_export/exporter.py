"""Checkpoints -> a checked ONNX model repository: the defended model per input kind and precision, and the
bare classifier / purifier on request. Every model is checked after it is written (see checks.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from safetensors.torch import load_file
from torch import nn

from atop_export import checks
from atop_export.graphs import (
    INPUT,
    OUTPUT,
    PURIFIED,
    RT_IMAGE,
    RT_MASK,
    ClassifierOnly,
    Core,
    Front,
    InputKind,
    PurifierOnly,
    example_input,
)
from atop_export.onnx_build import (
    compose,
    export_module,
    keep_weights_stored,
    optimize_offline,
    set_metadata,
    strip_build_records,
    to_fp16,
)
from atop_export.repository import publish_model, staged_model, write_report
from atop_models.checkpoint import int8_weights, paths
from atop_models.defended import LoadedDefense, load_defended
from atop_models.pipeline import DefendedClassifier

Precision = Literal["fp32", "fp16"]
StoredParts = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # part -> its int8 weights ({}: fp16)


@dataclass(frozen=True)
class ExportConfig:
    name: str = "atop_cifar10"  # the defended model; variants and pieces get suffixes
    version: int = 1
    inputs: tuple[InputKind, ...] = ("float", "uint8")  # float [N,3,H,W] in [0,1]; decoded uint8 [N,H,W,3]
    precisions: tuple[Precision, ...] = ("fp32",)  # fp16: for GPUs (weights and compute; FP32 inputs/outputs)
    pieces: tuple[str, ...] = ()  # "classifier", "purifier": the parts alone, for baselines and debugging
    opset: int = 18  # Col2Im (the contextual attention's fold) needs opset 18
    max_batch_size: int = 256  # Triton's max_batch_size and the exported batch dimension's upper bound
    optimization_level: str = "none"  # "basic": ship onnxruntime's basic offline optimization (onnx_build)
    gpu: bool = False  # instance_group kind in config.pbtxt
    parity_images: int = 32
    fp32_tolerance: float = 1e-4  # max |probability difference| vs PyTorch, FP32
    fp16_tolerance: float = 3e-2  # FP16 rounds every activation: looser


def _metadata(kind: InputKind, size: int, pipeline: DefendedClassifier, records: dict, extra: dict) -> dict[str, str]:
    layout = {"float": ("NCHW", "float32", [0.0, 1.0]), "uint8": ("NHWC", "uint8", [0, 255])}[kind]
    fields: dict[str, Any] = {
        "atop.labels": records["classifier"]["classes"],
        "atop.input": {
            "name": INPUT,
            "layout": layout[0],
            "dtype": layout[1],
            "height": size,
            "width": size,
            "channels": "RGB",
            "value_range": layout[2],
        },
        "atop.rt": pipeline.rt.config.to_dict(),
        "atop.pipeline": dataclasses.asdict(pipeline.config),
        "atop.checkpoints": {
            part: {
                "sha256": r["weights_sha256"],
                "arch": r["arch"],
                "arch_kwargs": r["arch_kwargs"],
                "recipe": r.get("recipe"),
                "metrics": r.get("metrics"),
            }
            for part, r in records.items()
        },
        **extra,
    }
    return {key: json.dumps(value) for key, value in fields.items()}


def _export_defended(
    pipeline: DefendedClassifier,
    kind: InputKind,
    size: int,
    config: ExportConfig,
    precision: Precision,
    stored_parts: StoredParts,
) -> onnx.ModelProto:
    if stored_parts and precision == "fp32":  # their weights stay FP16 / int8 in the file (the FP16 model: FP16)
        pipeline = copy.deepcopy(pipeline)
        for part, int8 in stored_parts.items():
            keep_weights_stored(getattr(pipeline, part), int8)
    front = export_module(
        Front(pipeline, kind),
        (example_input(kind, 2, size),),
        [INPUT],
        [RT_IMAGE, RT_MASK],
        config.opset,
        config.max_batch_size,
    )
    args = (torch.rand(2, 3, size, size), torch.zeros(2, 1, size, size))
    core = export_module(
        Core(pipeline), args, [RT_IMAGE, RT_MASK], [OUTPUT, PURIFIED], config.opset, config.max_batch_size
    )
    return compose(front, to_fp16(core) if precision == "fp16" else core)


def _stored_parts(loaded: LoadedDefense) -> StoredParts:
    """The parts whose checkpoints store their weights in fewer bytes than FP32: {part: its int8 weights} ({}
    for a part stored in fp16)."""
    parts: StoredParts = {}
    for part, built in (("classifier", loaded.classifier), ("purifier", loaded.purifier)):
        dtype = built.record.get("weights_dtype")
        if dtype == "float16":
            parts[part] = {}
        elif dtype == "int8":
            parts[part] = int8_weights(load_file(str(paths(built.path)[0])))
    return parts


def providers_for_checks() -> list[list[str]]:
    """CPU always; CUDA too where it is present (parity is then checked on both)."""
    available = ort.get_available_providers()
    return [["CPUExecutionProvider"]] + ([["CUDAExecutionProvider"]] if "CUDAExecutionProvider" in available else [])


@dataclass(frozen=True)
class PlannedModel:
    """One model of the repository: how its graph is exported, and the checks its written file must pass."""

    name: str
    kind: InputKind  # the input it takes
    info: dict[str, str]  # input, precision and role: recorded in its metadata and its report
    export: Callable[[], onnx.ModelProto]
    check: Callable[[Path], dict[str, Any]]


def _check_defended(
    pipeline: DefendedClassifier, kind: InputKind, size: int, images: torch.Tensor, tolerance: float, path: Path
) -> dict[str, Any]:
    return {
        "parity": [checks.defended_parity(path, pipeline, images, tolerance, p) for p in providers_for_checks()],
        "dynamic_batch": checks.dynamic_batch(path, kind, size, ["CPUExecutionProvider"]),
        "rt": checks.rt_statistics(path, pipeline.rt.config, kind, size, ["CPUExecutionProvider"]),
        "unpredictability": checks.unpredictability(path, kind, size),
    }


def _defended_plan(
    pipeline: DefendedClassifier, size: int, config: ExportConfig, stored_parts: StoredParts
) -> list[PlannedModel]:
    """The defended model for every input kind and precision: NAME[_uint8][_fp16]. `stored_parts`: the parts
    ("classifier", "purifier") whose checkpoints store their weights in fp16 or int8, as the FP32 model's file
    then does."""
    plan = []
    for kind in config.inputs:
        images = checks.parity_images(kind, config.parity_images, size)
        for precision in config.precisions:
            name = config.name + ("" if kind == "float" else f"_{kind}") + ("" if precision == "fp32" else "_fp16")
            tolerance = config.fp32_tolerance if precision == "fp32" else config.fp16_tolerance
            info = {"input": kind, "precision": precision, "role": "defended"}
            export = partial(_export_defended, pipeline, kind, size, config, precision, stored_parts)
            plan.append(
                PlannedModel(
                    name, kind, info, export, partial(_check_defended, pipeline, kind, size, images, tolerance)
                )
            )
    return plan


def _check_piece(feeds: dict[str, np.ndarray], expected: np.ndarray, tolerance: float, path: Path) -> dict[str, Any]:
    return {"parity": [checks.compare(path, feeds, expected, tolerance, p) for p in providers_for_checks()]}


def _piece(
    name: str, role: str, module: nn.Module, inputs: dict[str, torch.Tensor], output: str, config: ExportConfig
) -> PlannedModel:
    """A deterministic part of the pipeline alone (float input, FP32), checked against PyTorch on `inputs`."""
    with torch.no_grad():
        expected = module(*inputs.values()).numpy()
    feeds = {input_name: tensor.numpy() for input_name, tensor in inputs.items()}
    example = tuple(tensor[:2] for tensor in inputs.values())
    export = partial(export_module, module, example, list(inputs), [output], config.opset, config.max_batch_size)
    info = {"input": "float", "precision": "fp32", "role": role}
    return PlannedModel(name, "float", info, export, partial(_check_piece, feeds, expected, config.fp32_tolerance))


def _pieces_plan(pipeline: DefendedClassifier, size: int, config: ExportConfig) -> list[PlannedModel]:
    """NAME_classifier (the undefended baseline) and NAME_purifier (on one fixed RT draw), when asked for."""
    images = checks.parity_images("float", config.parity_images, size)
    plan = []
    if "classifier" in config.pieces:
        module = ClassifierOnly(pipeline.classifier, "float")
        plan.append(_piece(f"{config.name}_classifier", "classifier", module, {INPUT: images}, OUTPUT, config))
    if "purifier" in config.pieces:
        rt_image, mask = pipeline.rt(images, torch.Generator().manual_seed(0))
        inputs = {RT_IMAGE: rt_image, RT_MASK: mask}
        plan.append(_piece(f"{config.name}_purifier", "purifier", PurifierOnly(pipeline), inputs, PURIFIED, config))
    return plan


def _export_info(config: ExportConfig, command: str, info: dict[str, str]) -> dict[str, Any]:
    return {
        "atop.export": {
            "opset": config.opset,
            "optimization_level": config.optimization_level,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "command": command,
            **info,
        }
    }


def export_repository(
    classifier: str | Path, purifier: str | Path, repository: Path, config: ExportConfig, command: str = ""
) -> dict[str, dict]:
    """Write and check every requested model; returns {model name: its report}. Each model is checked under a
    staging name and only then moved to model.onnx, so a failed check (ExportCheckError) leaves no model that the
    server would load."""
    loaded = load_defended(classifier, purifier)
    pipeline, size = loaded.pipeline.eval(), loaded.image_size
    records = {"classifier": loaded.classifier.record, "purifier": loaded.purifier.record}
    reports: dict[str, dict] = {}
    stored_parts = _stored_parts(loaded)
    for planned in _defended_plan(pipeline, size, config, stored_parts) + _pieces_plan(pipeline, size, config):
        model = strip_build_records(optimize_offline(planned.export(), config.optimization_level))
        set_metadata(
            model, _metadata(planned.kind, size, pipeline, records, _export_info(config, command, planned.info))
        )
        with staged_model(repository, planned.name, config.version, model) as staged:
            checks.check_structure(staged)
            results = planned.check(staged)
            path = publish_model(staged, model, loaded.classes, config.max_batch_size, config.gpu)
        report = {"model": planned.name, "path": str(path.relative_to(repository)), **planned.info, "checks": results}
        write_report(repository, planned.name, report)
        reports[planned.name] = report
    return reports
