"""make bench: serving throughput and latency, as ratios to onnxruntime in-process, measured in one run.

  python tests/bench/serving.py --model-repository model_repository [--model atop_cifar10] [--seconds 10]

1. in-process: the model's own onnxruntime session (seeded as the server seeds it), batch 1 and batch 64;
2. atop-serve as a real process, driven by stock tritonclient.grpc clients: 1 closed-loop client, then 64,
   sending one FP32 image per request; then 64 clients sending JPEG bytes (decoding included).
Prints a table and writes JSON (--out). Ratios, not absolute numbers, are what carry across machines.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/serving.py, not this file
from serving import start_server

from atop_server.repository import load_model


def in_process(repository: Path, model: str, batch: int, seconds: float) -> dict:
    loaded = load_model(repository, model)
    spec = loaded.input_spec
    shape = (batch, 3, spec["height"], spec["width"])
    images = np.random.default_rng(0).random(shape, dtype=np.float32)
    name = loaded.inputs[0].name
    loaded.session.run(None, {name: images})
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        loaded.session.run(None, {name: images})
        done += batch
    return {"images_per_second": done / (time.perf_counter() - started)}


def closed_loop(address: str, model: str, clients: int, seconds: float, make_input) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        with triton.InferenceServerClient(address) as c:
            tensor = make_input()
            c.infer(model, [tensor])  # connect and warm up outside the measurement
            own = []
            while time.perf_counter() < stop:
                t = time.perf_counter()
                c.infer(model, [tensor])
                own.append(time.perf_counter() - t)
            with lock:
                latencies.extend(own)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ms = sorted(x * 1000 for x in latencies)
    return {
        "images_per_second": len(ms) / elapsed,
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[int(0.99 * (len(ms) - 1))],
        "requests": len(ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="atop_cifar10")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    size = load_model(args.model_repository, args.model).input_spec["height"]

    def fp32_input() -> triton.InferInput:
        tensor = triton.InferInput("IMAGE", [1, 3, size, size], "FP32")
        tensor.set_data_from_numpy(np.random.default_rng(1).random((1, 3, size, size), dtype=np.float32))
        return tensor

    def jpeg_input() -> triton.InferInput:
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(2).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
        tensor = triton.InferInput("IMAGE", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([buffer.getvalue()], dtype=object).reshape(1, 1))
        return tensor

    results = {
        "in_process_b1": in_process(args.model_repository, args.model, 1, args.seconds),
        "in_process_b64": in_process(args.model_repository, args.model, 64, args.seconds),
    }
    server = start_server(args.model_repository, "--models", args.model, "--max-batch-size", "64")
    try:
        results["server_c1_fp32"] = closed_loop(server.address, args.model, 1, args.seconds, fp32_input)
        results["server_c64_fp32"] = closed_loop(server.address, args.model, 64, args.seconds, fp32_input)
        results["server_c64_jpeg"] = closed_loop(server.address, args.model, 64, args.seconds, jpeg_input)
    finally:
        server.stop()
    results["ratios"] = {
        "server_c1 / in_process_b1": results["server_c1_fp32"]["images_per_second"]
        / results["in_process_b1"]["images_per_second"],
        "server_c64 / in_process_b64": results["server_c64_fp32"]["images_per_second"]
        / results["in_process_b64"]["images_per_second"],
        "jpeg_c64 / fp32_c64": results["server_c64_jpeg"]["images_per_second"]
        / results["server_c64_fp32"]["images_per_second"],
    }
    for name, value in results.items():
        print(f"{name:>28}: {json.dumps(value)}")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "seconds": args.seconds, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
