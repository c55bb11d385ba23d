"""make bench: atop-serve (S) against in-process onnxruntime (A) and a real NVIDIA Triton (C), in one run.

  python tests/bench/serving.py --model-repository model_repository --images ../shared/datasets/cifar10-jpg.tar.gz \\
      --triton-python .venv-bench/bin/python [--seconds 10] [--rounds 2] [--out .data/bench]

The same ONNX file everywhere. A: the model's onnxruntime session in this process on pre-decoded batches (the
limit a server can approach), at the largest batch each load can form. S: atop-serve as a real process.
C: tritonserver 2.51 from nvidia-pytriton with a Pillow-decoding Python front (tests/bench/triton_front.py).
S and C get the same load from stock tritonclient.grpc.aio clients: JPEG BYTES requests made of CIFAR-10 test
images, at concurrency 1, 8 and 64 (one image a request) and 8 clients x 16 images. Rounds are interleaved
(every load runs A, S and C in turn, in a rotating order, every round), so the machine's noise falls on all
three: the ratios are what to read, the absolute figures only as context.

Also measured in the same run: the graph's GFLOP per image and its time per operator (onnxruntime's
profiler), this CPU's matmul peak (onnxruntime MatMul), the graph's throughput against batch size, and image
size (32 vs 256 px, the test fixtures' small architecture exported by atop-export). Prints a table, writes
bench.json and bench.png into --out. --py-spy also records S's Python stacks under each load (after the
measured rounds, so the sampler's cost falls on no measured figure).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/serving.py, not this file
from image_sizes import image_size_sweeps
from inprocess import decode_seconds, efficiency, graph_profile, model_input, run_batches
from loads import LOADS, Load, Sample, drive
from plot import plot
from serving import RunningServer, start_server

from atop_server.repository import LoadedModel, load_model

SYSTEMS = ("A", "S", "C")


@dataclass(frozen=True)
class BenchConfig:
    model_repository: Path
    model: str
    images: Path  # the CIFAR-10 JPEG archive (../shared/datasets/cifar10-jpg.tar.gz)
    out: Path
    triton_python: Path | None  # the bench environment's interpreter; None: no Triton (A vs S only)
    image_count: int = 2048
    seconds: float = 10.0  # per system, load and round
    rounds: int = 2
    max_batch_size: int = 64  # S's and C's dynamic batchers
    sweep_seconds: float = 2.0
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    image_sizes: tuple[int, ...] = (32, 256)
    size_batches: tuple[int, ...] = (1, 8, 32)
    py_spy: Path | None = None  # py-spy's binary: record S's stacks under each load after the rounds


def read_jpegs(archive: Path, count: int) -> list[bytes]:
    """`count` CIFAR-10 test JPEGs, the classes interleaved."""
    if not archive.exists():
        raise SystemExit(f"{archive} is missing: pass --images (the CIFAR-10 JPEG archive of ../shared/datasets)")
    per_class: dict[str, list[bytes]] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 4 and parts[-3] == "test":
                per_class.setdefault(parts[-2], []).append(tar.extractfile(member).read())  # type: ignore[union-attr]
    interleaved = [image for row in zip(*per_class.values(), strict=False) for image in row]
    return interleaved[:count]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_at_start": os.getloadavg(), "python": sys.version}


@dataclass
class Triton:
    process: subprocess.Popen
    address: str

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_triton(config: BenchConfig) -> Triton:
    script = Path(__file__).with_name("triton_front.py")
    # The serving line comes on a pipe of its own: on stdout it can land inside one of tritonserver's log lines.
    ready_read, ready_write = os.pipe()
    command = [str(config.triton_python), str(script), "--model-repository", str(config.model_repository)]
    command += ["--model", config.model, "--max-batch-size", str(config.max_batch_size)]
    command += ["--ready-fd", str(ready_write)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, pass_fds=(ready_write,)
    )
    os.close(ready_write)  # the front holds the only write end: its exit reads as end of file
    log: collections.deque[str] = collections.deque(maxlen=30)
    # Keep reading its log so that the pipe never fills and blocks Triton.
    threading.Thread(target=log.extend, args=(process.stdout,), daemon=True).start()
    with os.fdopen(ready_read) as ready:
        line = ready.readline()
    if not line:
        raise RuntimeError(f"Triton exited with {process.wait()}:\n" + "".join(log))
    port = json.loads(line)["grpc_port"]
    return Triton(process, f"127.0.0.1:{port}")


def measure(
    system: str,
    load: Load,
    config: BenchConfig,
    loaded: LoadedModel,
    images: np.ndarray,
    addresses: dict[str, str],
    jpegs: list[bytes],
) -> Sample:
    """One window of one system at one load: A calls the session itself, S and C are driven by clients."""
    if system == "A":
        return run_batches(loaded.session, images, load.in_process_batch(config.max_batch_size), config.seconds)
    return asyncio.run(drive(addresses[system], config.model, load, jpegs, config.seconds))


def time_split(sample: Sample, load: Load, decode_ms: float) -> dict[str, float]:
    """Where an S request's time goes, in ms on average: decoding (this run's one-thread decode time per image x
    the request's images: an upper bound, the pool decodes up to 4 at once), waiting in the batcher's queue, the
    graph execution it rode in (atop-serve's compute statistics count executions, Triton's count requests), and
    the rest of the client's latency: gRPC, protobuf, the event loop, the answer, the client itself."""
    server = sample.server
    requests = max(server.get("requests", 0.0), 1.0)
    queue = server.get("queue_seconds", 0.0) / requests * 1000
    graph = server.get("compute_seconds", 0.0) / max(server.get("executions", 0.0), 1.0) * 1000
    decode = decode_ms * load.images
    mean = sample.summary()["mean_ms"]
    return {
        "client_latency_ms": mean,
        "decode_ms": decode,
        "queue_ms": queue,
        "graph_ms": graph,
        "response_and_transport_ms": max(mean - decode - queue - graph, 0.0),
        "images_per_execution": server.get("inferences", 0.0) / max(server.get("executions", 0.0), 1.0),
    }


def profile_server(server: RunningServer, config: BenchConfig, jpegs: list[bytes], py_spy: Path) -> dict[str, str]:
    """py-spy's folded stacks of S under each load (raw format: one stack per line, then its sample count)."""
    files = {}
    for load in LOADS:
        out = config.out / f"py-spy-{load.name}.txt"
        record = [str(py_spy), "record", "--pid", str(server.process.pid), "--duration", str(int(config.seconds))]
        record += ["--rate", "50", "--format", "raw", "--threads", "--idle", "--output", str(out)]
        spy = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)  # attached before the clients start
        asyncio.run(drive(server.address, config.model, load, jpegs, config.seconds))
        spy.wait(60)
        files[load.name] = out.name
    return files


def run(config: BenchConfig) -> dict:
    config.out.mkdir(parents=True, exist_ok=True)
    jpegs = read_jpegs(config.images, config.image_count)
    model_file = config.model_repository / config.model / "1" / "model.onnx"
    loaded = load_model(config.model_repository, config.model)
    images = model_input(loaded, jpegs)
    report: dict = {
        "model": config.model,
        "machine": machine(),
        "config": {k: str(v) for k, v in asdict(config).items()},
    }
    report["graph"] = graph_profile(model_file, images[: config.max_batch_size])
    report["decode_ms_per_image"] = decode_seconds(jpegs[:512], loaded.input_spec["height"]) * 1000
    sweep = {
        b: run_batches(loaded.session, images, b, config.sweep_seconds).summary()
        for b in tqdm(config.batch_sizes, desc="batch sizes")
    }
    report["batch_sweep"] = sweep
    best = max(sweep, key=lambda b: sweep[b]["images_per_second"])
    report["graph_efficiency"] = efficiency(loaded.session, images, best, report["graph"]["gflop_per_image"])

    servers: dict[str, object] = {}
    addresses: dict[str, str] = {}
    server = start_server(
        config.model_repository, "--models", config.model, "--max-batch-size", str(config.max_batch_size)
    )
    servers["S"], addresses["S"] = server, server.address
    systems = ["A", "S"]
    if config.triton_python is None:
        report["triton"] = "not run (no --triton-python)"
    else:
        try:
            triton = start_triton(config)
        except (RuntimeError, OSError) as error:
            report["triton"] = f"could not start: {error}"
        else:
            servers["C"], addresses["C"] = triton, triton.address
            systems.append("C")
            report["triton"] = "tritonserver 2.51 via nvidia-pytriton"
    samples = {(system, load.name): Sample() for system in systems for load in LOADS}
    try:
        steps = [(r, i, load) for r in range(config.rounds) for i, load in enumerate(LOADS)]
        for r, i, load in tqdm(steps, desc="rounds x loads"):
            shift = (r + i) % len(systems)
            for system in systems[shift:] + systems[:shift]:  # each system goes first as often as the others
                sample = measure(system, load, config, loaded, images, addresses, jpegs)
                samples[(system, load.name)].merge(sample)
        if config.py_spy:
            report["py_spy"] = profile_server(server, config, jpegs, config.py_spy)
    finally:
        for running in servers.values():
            running.stop()  # type: ignore[attr-defined]

    report["image_sizes"] = image_size_sweeps(
        config.out / "models", config.image_sizes, config.size_batches, config.sweep_seconds
    )
    report["loads"] = {}
    for load in LOADS:
        row = {system: samples[(system, load.name)].summary() for system in systems}
        row["A"]["batch"] = load.in_process_batch(config.max_batch_size)
        for system in systems[1:]:
            row[system]["server"] = samples[(system, load.name)].server
        row["ratios"] = ratios(row, sweep)
        row["S_time_split"] = time_split(samples[("S", load.name)], load, report["decode_ms_per_image"])
        report["loads"][load.name] = row
    return report


def ratios(row: dict, sweep: dict) -> dict[str, float]:
    """S / A at the load's own batch and at the best batch size of the sweep (the graph's ceiling), S / C."""
    s = row["S"]["images_per_second"]
    best = max(summary["images_per_second"] for summary in sweep.values())
    out = {"S/A": s / row["A"]["images_per_second"], "S/A_best": s / best}
    if "C" in row:
        out["S/C"] = s / row["C"]["images_per_second"]
        out["S/C_p99"] = row["S"]["p99_ms"] / row["C"]["p99_ms"]
    return out


def _cell(row: dict, system: str) -> str:
    if system not in row:
        return "-"
    r = row[system]
    batch = f"b{r['batch']}: " if system == "A" else ""
    return f"{batch}{r['images_per_second']:.0f} img/s, p50 {r['p50_ms']:.1f} / p99 {r['p99_ms']:.1f} ms"


def table(report: dict) -> str:
    lines = [
        "| load | A in-process | S atop-serve | C Triton | S / A | S / A best | S / C |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in report["loads"].items():
        q = row["ratios"]
        cells = " | ".join(_cell(row, system) for system in SYSTEMS)
        lines.append(f"| {name} | {cells} | {q['S/A']:.2f} | {q['S/A_best']:.2f} | {q.get('S/C', float('nan')):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="atop_cifar10")
    parser.add_argument("--images", type=Path, default=Path("../shared/datasets/cifar10-jpg.tar.gz"))
    parser.add_argument("--triton-python", type=Path, default=None, help="the bench environment's python (C)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per system, load and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(".data/bench"))
    parser.add_argument("--no-image-sizes", action="store_true", help="skip the 32 vs 256 px export and sweep")
    parser.add_argument("--py-spy", type=Path, default=None, help="py-spy binary: also record S's stacks per load")
    args = parser.parse_args()
    config = BenchConfig(
        model_repository=args.model_repository,
        model=args.model,
        images=args.images,
        out=args.out,
        triton_python=args.triton_python,
        seconds=args.seconds,
        rounds=args.rounds,
        image_sizes=() if args.no_image_sizes else BenchConfig.image_sizes,
        py_spy=args.py_spy,
    )
    started = time.monotonic()
    report = run(config)
    report["wall_seconds"] = time.monotonic() - started
    print(table(report))
    graph, achieved = report["graph"], report["graph_efficiency"]
    print(
        f"graph: {graph['gflop_per_image']:.3f} GFLOP/image; at its best batch ({achieved['batch']}) "
        f"{achieved['graph_gflops']:.1f} GFLOP/s = {achieved['of_matmul_peak']:.0%} of the matmul peak "
        f"({achieved['matmul_peak_gflops']:.1f} GFLOP/s, pairs of windows); "
        f"decode {report['decode_ms_per_image']:.2f} ms/image"
    )
    (config.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, config.out / "bench.png")
    print(f"wrote {config.out / 'bench.json'} and {config.out / 'bench.png'} ({report['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
