"""The GPU benchmark of issue 23: the shipped graph on onnxruntime's CUDA execution provider, FP32 and FP16,
inputs and outputs bound on the device (IOBinding), and the purifier -> classifier chain with the purified
images kept on the device between the two sessions (no host copy). Under 10 minutes.

  # a repository with the FP16 variant and the pieces (atop-export, on any machine with torch):
  atop-export --classifier models/zoo/classifier --purifier models/zoo/purifier --repository .data/gpu_repository \\
      --inputs float --precisions fp32 fp16 --pieces classifier purifier
  # then, where onnxruntime-gpu is installed (the CPU path runs the same code, for testing):
  python tests/bench/gpu.py --model-repository .data/gpu_repository [--provider CPUExecutionProvider] \\
      [--out .data/bench/gpu.json]

Measures, per variant and batch size: images/s and p50/p99 of one call, with the batch already on the device
(what a server that decodes into pinned device buffers would see); the nodes the provider did not take (each
one a host round trip); and the GPU's name. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tqdm import tqdm


@dataclass(frozen=True)
class GpuBenchConfig:
    model_repository: Path
    model: str
    provider: str
    batch_sizes: tuple[int, ...] = (1, 8, 64, 256)
    seconds: float = 5.0  # per variant and batch size


def device_of(provider: str) -> str:
    return "cuda" if provider == "CUDAExecutionProvider" else "cpu"


def session(path: Path, provider: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.enable_profiling = True  # read once for node placement (host_nodes), then stopped and deleted
    # onnxruntime writes its profile into the working directory unless told otherwise (a checkout, here).
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "atop-gpu-bench")
    return ort.InferenceSession(str(path), options, providers=[provider])


def host_nodes(sess: ort.InferenceSession) -> dict[str, int]:
    """Node kernels run by another provider than the first one asked for (CPU fallbacks: host copies)."""
    wanted = sess.get_providers()[0]
    profile = Path(sess.end_profiling())
    events = json.loads(profile.read_text())
    profile.unlink()
    counts: dict[str, int] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and args.get("provider") not in (None, wanted):
            counts[args["op_name"]] = counts.get(args["op_name"], 0) + 1
    return counts


def timed(run: object, seconds: float, images: int) -> dict[str, float]:
    run()  # warm-up: kernels chosen, memory arenas grown
    latencies = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        run()
        latencies.append((time.perf_counter() - t) * 1000)
    ms = sorted(latencies)
    return {
        "images_per_second": len(ms) * images / (time.perf_counter() - started),
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[int(0.99 * (len(ms) - 1))],
    }


def whole_graph(path: Path, config: GpuBenchConfig, batch: int) -> tuple[dict, dict[str, int]]:
    """IMAGE on the device -> PROBABILITIES on the device, through one IOBinding reused across calls."""
    sess = session(path, config.provider)
    device = device_of(config.provider)
    images = np.random.default_rng(batch).random((batch, 3, *sess.get_inputs()[0].shape[2:]), dtype=np.float32)
    binding = sess.io_binding()
    binding.bind_ortvalue_input(sess.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(images, device, 0))
    binding.bind_output(sess.get_outputs()[0].name, device)

    def run() -> None:
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    result = timed(run, config.seconds, batch)
    return result, host_nodes(sess)


def chained(repository: Path, config: GpuBenchConfig, batch: int) -> dict:
    """purifier piece -> classifier piece, the purified batch handed over as a device OrtValue (no host copy).
    One RT draw is made on the host and uploaded once: the chain, not RT, is what this times."""
    purifier = session(repository / f"{config.model}_purifier" / "1" / "model.onnx", config.provider)
    classifier = session(repository / f"{config.model}_classifier" / "1" / "model.onnx", config.provider)
    device = device_of(config.provider)
    size = purifier.get_inputs()[0].shape[2:]
    rng = np.random.default_rng(batch)
    rt_image = rng.random((batch, 3, *size), dtype=np.float32)
    rt_mask = (rng.random((batch, 1, *size)) < 0.25).astype(np.float32)
    first = purifier.io_binding()
    for spec, value in zip(purifier.get_inputs(), (rt_image, rt_mask), strict=True):
        first.bind_ortvalue_input(spec.name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
    first.bind_output(purifier.get_outputs()[0].name, device)
    second = classifier.io_binding()
    second.bind_output(classifier.get_outputs()[0].name, device)

    def run() -> None:
        purifier.run_with_iobinding(first)
        second.bind_ortvalue_input(classifier.get_inputs()[0].name, first.get_outputs()[0])  # stays on the device
        classifier.run_with_iobinding(second)
        second.synchronize_outputs()

    return timed(run, config.seconds, batch)


def gpu_name() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "no GPU (nvidia-smi not found)"


def run(config: GpuBenchConfig) -> dict:
    repository, name = config.model_repository, config.model
    variants = {
        "fp32": repository / name / "1" / "model.onnx",
        "fp16": repository / f"{name}_fp16" / "1" / "model.onnx",
    }
    report: dict = {"gpu": gpu_name(), "provider": config.provider, "onnxruntime": ort.__version__, "results": {}}
    steps = [(v, b) for v in variants if variants[v].exists() for b in config.batch_sizes]
    for variant, batch in tqdm(steps, desc="variants x batch sizes"):
        result, fallbacks = whole_graph(variants[variant], config, batch)
        report["results"].setdefault(variant, {})[batch] = result
        report.setdefault("host_nodes", {})[variant] = fallbacks
    if (repository / f"{name}_purifier").exists() and (repository / f"{name}_classifier").exists():
        for batch in tqdm(config.batch_sizes, desc="purifier -> classifier"):
            report["results"].setdefault("fp32 pieces chained", {})[batch] = chained(repository, config, batch)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", default="atop_cifar10")
    parser.add_argument("--provider", default="CUDAExecutionProvider", help="CPUExecutionProvider: the test path")
    parser.add_argument("--seconds", type=float, default=GpuBenchConfig.seconds)
    parser.add_argument("--out", type=Path, default=Path(".data/bench/gpu.json"))
    args = parser.parse_args()
    if args.provider not in ort.get_available_providers():
        raise SystemExit(f"{args.provider} is not in this onnxruntime ({ort.get_available_providers()})")
    config = GpuBenchConfig(args.model_repository, args.model, args.provider, seconds=args.seconds)
    report = run(config)
    print(f"{report['gpu']}, {config.provider}, onnxruntime {report['onnxruntime']}")
    for variant, rows in report["results"].items():
        for batch, r in rows.items():
            rate = f"{r['images_per_second']:9.1f} img/s"
            print(f"{variant:>20} b{batch:<4} {rate}  p50 {r['p50_ms']:7.2f}  p99 {r['p99_ms']:7.2f} ms")
    print(f"nodes on another provider (host round trips): {report.get('host_nodes')}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
