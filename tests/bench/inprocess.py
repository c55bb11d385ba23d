"""The in-process side of make bench (A): the model's own onnxruntime session on pre-decoded batches, the
graph's FLOP count and per-node time from onnxruntime's profiler, and this CPU's matmul peak."""

from __future__ import annotations

import collections
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from loads import Sample
from onnx import TensorProto, helper

from atop_server.codec import decode_image
from atop_server.repository import LoadedModel
from atop_server.session import create_session


def model_input(loaded: LoadedModel, jpegs: list[bytes]) -> np.ndarray:
    """The JPEGs decoded as the server decodes them, in the graph's input layout: A's pre-decoded images."""
    spec = loaded.input_spec
    pixels = np.stack([decode_image(data, int(spec["height"]), i) for i, data in enumerate(jpegs)])
    if spec["layout"] == "NHWC":
        return pixels
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)


def decode_seconds(jpegs: list[bytes], size: int) -> float:
    """Seconds to decode one image with the server's decoder (mean over all of them, one thread)."""
    started = time.perf_counter()
    for i, data in enumerate(jpegs):
        decode_image(data, size, i)
    return (time.perf_counter() - started) / len(jpegs)


def run_batches(session: ort.InferenceSession, images: np.ndarray, batch: int, seconds: float) -> Sample:
    """Closed loop of session.run on consecutive `batch`-image slices for `seconds` (after one warm-up call)."""
    name = session.get_inputs()[0].name
    batches = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
    session.run(None, {name: batches[0]})
    latencies, done = [], 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        session.run(None, {name: batches[len(latencies) % len(batches)]})
        latencies.append((time.perf_counter() - t) * 1000)
        done += batch
    return Sample(done, time.perf_counter() - started, latencies)


def _node_events(model: Path, images: np.ndarray, optimization: ort.GraphOptimizationLevel, runs: int) -> list:
    """onnxruntime's profiler events of each node of `runs` calls (after one untimed call)."""
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = optimization
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "ort")
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(runs + 1):
            session.run(None, {name: images})
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return nodes[len(nodes) // (runs + 1) :]  # the untimed call's nodes come first


def graph_profile(model: Path, images: np.ndarray, runs: int = 3) -> dict:
    """GFLOP per image of the graph as exported (convolutions and matmuls, 2 FLOP a multiply-add, from the
    shapes the profiler records on the unoptimized graph: the optimized one pads channels to the NCHWc block),
    and where the optimized graph's time goes, per operator type and per node."""
    flops = 0
    for event in _node_events(model, images[:8], ort.GraphOptimizationLevel.ORT_DISABLE_ALL, 1):
        op = event["args"]["op_name"]
        shapes_in = [next(iter(d.values())) for d in event["args"].get("input_type_shape", [])]
        shapes_out = [next(iter(d.values())) for d in event["args"].get("output_type_shape", [])]
        if op == "Conv":
            flops += 2 * math.prod(shapes_out[0]) * math.prod(shapes_in[1][1:])
        elif op in ("MatMul", "Gemm"):
            flops += 2 * math.prod(shapes_out[0]) * shapes_in[0][-1]
    per_op: collections.Counter[str] = collections.Counter()
    per_node: collections.Counter[str] = collections.Counter()
    for event in _node_events(model, images, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, runs):
        op = event["args"]["op_name"]
        per_op[op] += event["dur"]
        per_node[f"{event['name'].removesuffix('_kernel_time')} ({op})"] += event["dur"]
    total = sum(per_op.values())
    return {
        "gflop_per_image": flops / min(len(images), 8) / 1e9,
        "batch": len(images),
        "node_ms_per_run": total / runs / 1000,
        "ops": {op: round(us / total, 4) for op, us in per_op.most_common(12)},
        "top_nodes_ms": {node: round(us / runs / 1000, 2) for node, us in per_node.most_common(10)},
    }


def efficiency(
    session: ort.InferenceSession, images: np.ndarray, batch: int, gflop_per_image: float, pairs: int = 5
) -> dict[str, float]:
    """The graph's GFLOP/s at `batch` against the matmul peak, in back-to-back 1 s windows of each: on a shared
    machine the peak itself moves with the neighbours, so each pair's ratio is taken, then their median."""
    ratios, graph, peak = [], [], []
    for _ in range(pairs):
        peak.append(matmul_peak_gflops(1.0))
        graph.append(run_batches(session, images, batch, 1.0).summary()["images_per_second"] * gflop_per_image)
        ratios.append(graph[-1] / peak[-1])
    return {
        "batch": batch,
        "graph_gflops": statistics.median(graph),
        "matmul_peak_gflops": statistics.median(peak),
        "of_matmul_peak": statistics.median(ratios),
    }


def matmul_peak_gflops(seconds: float, size: int = 1024) -> float:
    """FP32 GFLOP/s of onnxruntime's own matmul kernel (MLAS, the kernels the graph's convolutions run on) on
    square matrices with the sessions' thread settings: the CPU's reachable FMA peak."""
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [size, size])
    b = helper.make_tensor_value_info("B", TensorProto.FLOAT, [size, size])
    c = helper.make_tensor_value_info("C", TensorProto.FLOAT, [size, size])
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul", [a, b], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    session = create_session(model.SerializeToString())
    rng = np.random.default_rng(0)
    feeds = {"A": rng.random((size, size), dtype=np.float32), "B": rng.random((size, size), dtype=np.float32)}
    session.run(None, feeds)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, feeds)
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - started) / 1e9
