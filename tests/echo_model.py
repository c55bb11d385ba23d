"""Deterministic stand-in classifiers for serving tests, written as real ONNX files in a real model repository.

The exported models draw RT on every run, so their outputs cannot say which image a row came from. These
score each image by its three channel means (softmax of SHARPNESS x mean: classes red, green, blue), so every
output row is known from its input: a row that lands with the wrong image, a draw averaged with another
image's, or pixels sent in the wrong layout or scale all show. `slow` adds a chain of large matrix products
per image (its result weighted 0 in the scores): a model that takes milliseconds per image, measured at
warm-up, so that admission control and deadlines have real work to weigh.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

LABELS = ["red", "green", "blue"]
SHARPNESS = 8.0
SIZE = 32
SLOW_PRODUCTS = 12  # [N,3072] x [3072,3072] products per execution: milliseconds per image on a CPU core


def expected_probabilities(unit_nchw: np.ndarray) -> np.ndarray:
    """What the echo models answer for float [N,3,H,W] images in [0,1]."""
    logits = SHARPNESS * unit_nchw.astype(np.float64).mean(axis=(2, 3))
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return exp / exp.sum(1, keepdims=True)


def _scores(unit: str, nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], slow: bool) -> None:
    """Append the nodes mapping float NCHW `unit` to PROBABILITIES."""
    initializers.append(helper.make_tensor("sharpness", TensorProto.FLOAT, [], [SHARPNESS]))
    nodes += [
        helper.make_node("ReduceMean", [unit], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("Mul", ["means", "sharpness"], ["logits"]),
    ]
    if slow:
        features = 3 * SIZE * SIZE
        initializers += [
            helper.make_tensor("flat_shape", TensorProto.INT64, [2], [0, features]),
            helper.make_tensor("weight_shape", TensorProto.INT64, [2], [features, features]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        ]
        nodes += [
            helper.make_node("Reshape", [unit, "flat_shape"], ["work0"]),
            helper.make_node(
                "ConstantOfShape",
                ["weight_shape"],
                ["weight"],
                value=helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0 / features]),
            ),
        ]
        for i in range(SLOW_PRODUCTS):
            nodes.append(helper.make_node("MatMul", [f"work{i}", "weight"], [f"work{i + 1}"]))
        nodes += [
            helper.make_node("ReduceMean", [f"work{SLOW_PRODUCTS}"], ["work_mean"], axes=[1], keepdims=1),
            helper.make_node("Mul", ["work_mean", "zero"], ["nothing"]),
            helper.make_node("Add", ["logits", "nothing"], ["scored"]),
        ]
    nodes.append(helper.make_node("Softmax", ["scored" if slow else "logits"], ["PROBABILITIES"], axis=1))


def _write(repository: Path, name: str, layout: str, slow: bool = False) -> None:
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    if layout == "NHWC":  # decoded UINT8 pixels, as the exporter's uint8 graphs take them
        image = helper.make_tensor_value_info("IMAGE", TensorProto.UINT8, ["N", SIZE, SIZE, 3])
        initializers.append(helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 255]))
        nodes += [
            helper.make_node("Cast", ["IMAGE"], ["pixels"], to=TensorProto.FLOAT),
            helper.make_node("Transpose", ["pixels"], ["nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Mul", ["nchw", "scale"], ["unit"]),
        ]
        unit = "unit"
    else:
        image = helper.make_tensor_value_info("IMAGE", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])
        unit = "IMAGE"
    _scores(unit, nodes, initializers, slow)
    output = helper.make_tensor_value_info("PROBABILITIES", TensorProto.FLOAT, ["N", len(LABELS)])
    graph = helper.make_graph(nodes, name, [image], [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    spec = {"name": "IMAGE", "layout": layout, "dtype": "uint8" if layout == "NHWC" else "float32"}
    metadata = {"atop.labels": LABELS, "atop.input": {**spec, "height": SIZE, "width": SIZE}}
    helper.set_model_props(model, {key: json.dumps(value) for key, value in metadata.items()})
    onnx.checker.check_model(model, full_check=True)
    target = repository / name / "1" / "model.onnx"
    target.parent.mkdir(parents=True)
    onnx.save(model, target)


def write_echo_repository(repository: Path) -> Path:
    """Models echo (FP32 NCHW), echo_uint8 (UINT8 NHWC) and slow (FP32 NCHW, milliseconds per image)."""
    _write(repository, "echo", "NCHW")
    _write(repository, "echo_uint8", "NHWC")
    _write(repository, "slow", "NCHW", slow=True)
    return repository
