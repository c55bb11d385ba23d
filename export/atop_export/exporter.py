"""Checkpoints -> a checked ONNX model repository: the defended model per input kind and precision, and the
bare classifier / purifier on request. Every model is checked after it is written (see checks.py)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import onnx
import onnxruntime as ort
import torch

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
from atop_export.onnx_build import compose, export_module, optimize_offline, set_metadata, to_fp16
from atop_export.repository import write_model, write_report
from atop_models.checkpoint import load_model
from atop_models.pipeline import DefendedClassifier, PipelineConfig
from atop_models.rt import RandomTransform, RTConfig

Precision = Literal["fp32", "fp16"]


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


def load_pipeline(classifier: str | Path, purifier: str | Path) -> tuple[DefendedClassifier, dict, dict]:
    classifier_model, classifier_record = load_model(classifier, "classifier")
    purifier_model, purifier_record = load_model(purifier, "purifier")
    if classifier_record["image_size"] != purifier_record["image_size"]:
        raise ValueError(
            f"classifier is {classifier_record['image_size']} px, purifier {purifier_record['image_size']} px"
        )
    if purifier_record.get("classes", classifier_record["classes"]) != classifier_record["classes"]:
        raise ValueError("the purifier was trained with a classifier of other classes")
    rt = RandomTransform(RTConfig(**purifier_record["rt"]))
    pipeline = DefendedClassifier(rt, purifier_model, classifier_model, PipelineConfig(**purifier_record["pipeline"]))
    return pipeline.eval(), classifier_record, purifier_record


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
    pipeline: DefendedClassifier, kind: InputKind, size: int, config: ExportConfig, precision: Precision
) -> onnx.ModelProto:
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


def providers_for_checks() -> list[list[str]]:
    """CPU always; CUDA too where it is present (parity is then checked on both)."""
    available = ort.get_available_providers()
    return [["CPUExecutionProvider"]] + ([["CUDAExecutionProvider"]] if "CUDAExecutionProvider" in available else [])


def export_repository(
    classifier: str | Path, purifier: str | Path, repository: Path, config: ExportConfig, command: str = ""
) -> dict[str, dict]:
    """Write and check every requested model; returns {model name: its report}."""
    pipeline, classifier_record, purifier_record = load_pipeline(classifier, purifier)
    records = {"classifier": classifier_record, "purifier": purifier_record}
    size, labels = classifier_record["image_size"], classifier_record["classes"]
    reports: dict[str, dict] = {}

    def finish(name: str, model: onnx.ModelProto, kind: InputKind, run_checks: Any, extra: dict) -> None:
        export_info = {
            "atop.export": {
                "opset": config.opset,
                "optimization_level": config.optimization_level,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "command": command,
                **extra,
            }
        }
        model = optimize_offline(model, config.optimization_level)
        set_metadata(model, _metadata(kind, size, pipeline, records, export_info))
        path = write_model(repository, name, config.version, model, labels, config.max_batch_size, config.gpu)
        checks.check_structure(path)
        report = {"model": name, "path": str(path.relative_to(repository)), **extra, "checks": run_checks(path)}
        write_report(repository, name, report)
        reports[name] = report

    for kind in config.inputs:
        images = checks.parity_images(kind, config.parity_images, size)
        for precision in config.precisions:
            name = config.name + ("" if kind == "float" else f"_{kind}") + ("" if precision == "fp32" else "_fp16")
            tolerance = config.fp32_tolerance if precision == "fp32" else config.fp16_tolerance
            model = _export_defended(pipeline, kind, size, config, precision)

            def run_checks(
                path: Path, kind: InputKind = kind, tolerance: float = tolerance, images: torch.Tensor = images
            ) -> dict:
                return {
                    "parity": [
                        checks.defended_parity(path, pipeline, images, tolerance, p) for p in providers_for_checks()
                    ],
                    "dynamic_batch": checks.dynamic_batch(path, kind, size, ["CPUExecutionProvider"]),
                    "rt": checks.rt_statistics(path, pipeline.rt.config, kind, size, ["CPUExecutionProvider"]),
                    "unpredictability": checks.unpredictability(path, kind, size),
                }

            finish(name, model, kind, run_checks, {"input": kind, "precision": precision, "role": "defended"})

    images = checks.parity_images("float", config.parity_images, size)
    if "classifier" in config.pieces:
        with torch.no_grad():
            expected = ClassifierOnly(pipeline.classifier, "float")(images).numpy()
        model = export_module(
            ClassifierOnly(pipeline.classifier, "float"),
            (images[:2],),
            [INPUT],
            [OUTPUT],
            config.opset,
            config.max_batch_size,
        )
        finish(
            f"{config.name}_classifier",
            model,
            "float",
            lambda path: {
                "parity": [
                    checks.compare(path, {INPUT: images.numpy()}, expected, config.fp32_tolerance, p)
                    for p in providers_for_checks()
                ]
            },
            {"input": "float", "precision": "fp32", "role": "classifier"},
        )
    if "purifier" in config.pieces:
        generator = torch.Generator().manual_seed(0)
        rt_image, mask = pipeline.rt(images, generator)
        with torch.no_grad():
            expected = PurifierOnly(pipeline)(rt_image, mask).numpy()
        model = export_module(
            PurifierOnly(pipeline),
            (rt_image[:2], mask[:2]),
            [RT_IMAGE, RT_MASK],
            [PURIFIED],
            config.opset,
            config.max_batch_size,
        )
        feeds = {RT_IMAGE: rt_image.numpy(), RT_MASK: mask.numpy()}
        finish(
            f"{config.name}_purifier",
            model,
            "float",
            lambda path: {
                "parity": [
                    checks.compare(path, feeds, expected, config.fp32_tolerance, p) for p in providers_for_checks()
                ]
            },
            {"input": "float", "precision": "fp32", "role": "purifier"},
        )
    return reports
