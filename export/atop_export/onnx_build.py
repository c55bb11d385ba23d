"""PyTorch modules -> ONNX models: dynamo export with a dynamic batch, FP16 conversion, composition, metadata."""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import onnx
import onnx.compose
import onnxruntime as ort
import torch
from onnxruntime.transformers.float16 import convert_float_to_float16
from torch import nn

from atop_export.graphs import INPUT, OUTPUT, PURIFIED, RT_IMAGE, RT_MASK, RT_OUTPUT

FRONT, CORE = "front/", "core/"
# Where the RT draws live inside a composed model: the exporter's checks read them, nothing else does.
RT_IMAGE_TENSOR, RT_MASK_TENSOR = FRONT + RT_IMAGE, FRONT + RT_MASK


def export_module(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    max_batch: int,
) -> onnx.ModelProto:
    """Dynamo-based export (the contextual attention's `fold` becomes Col2Im, which the TorchScript exporter
    cannot emit) with dimension 0 of every input dynamic, so one graph serves any batch size."""
    module.eval()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    dynamic_shapes = tuple({0: batch} for _ in args)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's progress chatter; failures still raise
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    assert program is not None
    return program.model_proto


# onnxscript's optimizer does not constant-fold an op with an input above this many elements (its default limit)
FOLD_INPUT_LIMIT = 8192


def _widen(module: nn.Module, args: tuple) -> None:
    module.weight = module.weight_stored.float()


def _widen_scaled(module: nn.Module, args: tuple) -> None:
    module.weight = module.weight_stored.float() * module.weight_scale


def keep_weights_stored(
    module: nn.Module, int8: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
) -> nn.Module:
    """Make the export of `module` store its conv and linear weights as its checkpoint does: in FP16 (a
    checkpoint stored in fp16, `python -m atop_models.checkpoint half`), or, for those named in `int8` (a
    checkpoint stored in int8: {weight name: (int8 values, per-output-channel scales)}), in int8. Each becomes a
    buffer that a hook widens before every call (times its scale), so the graph reads it through a Cast (and a
    Mul). The exporter's optimizer then leaves it alone: it folds neither a Cast of so large an input nor a
    BatchNorm into a weight that is not an initializer (folded, the weight would no longer be exact).
    onnxruntime folds both when it loads the graph, so it computes in FP32 with the same values as the module;
    only the file holds fewer bytes. Weights under FOLD_INPUT_LIMIT values are left as they are (the optimizer
    would fold them back). In place; returns it."""
    for name, layer in module.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.weight.numel() >= FOLD_INPUT_LIMIT:
            quantized = (int8 or {}).get(f"{name}.weight")
            half = layer.weight.detach().half()
            del layer.weight
            if quantized is None:
                layer.register_buffer("weight_stored", half)
                layer.register_forward_pre_hook(_widen)
            else:
                values, scale = quantized
                layer.register_buffer("weight_stored", values)
                layer.register_buffer("weight_scale", scale.view(-1, *[1] * (values.dim() - 1)))
                layer.register_forward_pre_hook(_widen_scaled)
    return module


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and compute in FP16 for GPUs; inputs and outputs stay FP32 so clients see no difference."""
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    _topological_sort(converted.graph)  # the converter appends its input casts at the end of the node list
    del converted.graph.value_info[:]  # shape annotations left from FP32 (stale element types); re-inferable
    return converted


def _topological_sort(graph: onnx.GraphProto) -> None:
    available = {"", *(i.name for i in graph.input), *(i.name for i in graph.initializer)}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ValueError(f"graph has a cycle or a dangling input near node {pending[0].name!r}")
        for node in ready:
            available.update(node.output)
        ordered += ready
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new


def compose(front: onnx.ModelProto, core: onnx.ModelProto) -> onnx.ModelProto:
    """front (IMAGE -> rt_image, rt_mask) + core (rt_image, rt_mask -> PROBABILITIES, PURIFIED) -> one graph
    with the outputs PROBABILITIES (first: what servers and clients classify with), RT_IMAGE and PURIFIED."""
    front = onnx.compose.add_prefix(front, FRONT)
    core = onnx.compose.add_prefix(core, CORE)
    merged = onnx.compose.merge_models(
        front, core, io_map=[(RT_IMAGE_TENSOR, CORE + RT_IMAGE), (RT_MASK_TENSOR, CORE + RT_MASK)]
    )
    _rename(merged.graph, FRONT + INPUT, INPUT)
    _rename(merged.graph, CORE + OUTPUT, OUTPUT)
    _rename(merged.graph, CORE + PURIFIED, PURIFIED)
    # The RT draw keeps its internal name (the exporter's checks cut the graph there) and leaves by an Identity.
    merged.graph.node.append(onnx.helper.make_node("Identity", [RT_IMAGE_TENSOR], [RT_OUTPUT], name=RT_OUTPUT))
    rt_image = next(value for value in front.graph.output if value.name == RT_IMAGE_TENSOR)
    outputs = {value.name: value for value in merged.graph.output}
    ordered = [outputs[OUTPUT], onnx.helper.make_value_info(RT_OUTPUT, rt_image.type), outputs[PURIFIED]]
    del merged.graph.output[:]
    merged.graph.output.extend(ordered)
    return merged


OPTIMIZATION_LEVELS = ("none", "basic")


def optimize_offline(model: onnx.ModelProto, level: str) -> onnx.ModelProto:
    """Optionally run onnxruntime's graph optimizer once, at export, and ship its result. Only "basic"
    (constant folding, redundant-node removal) is offered: higher levels emit hardware-specific fused
    contrib ops that other runtimes (and onnx.checker) do not know; servers apply them at load time."""
    if level not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization level must be one of {OPTIMIZATION_LEVELS}, got {level!r}")
    if level == "none":
        return model
    with tempfile.TemporaryDirectory() as workdir:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(workdir) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def strip_build_records(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop what the exporter records on each node about the build (PyTorch's stack trace, with this machine's
    source paths, its module names and FX node): a twentieth of a small model's file, used by no runtime. The
    model's own metadata (labels, RT, checkpoints, export) stays. In place; returns it."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return model


def set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    onnx.helper.set_model_props(model, metadata)
