"""make loadtest: atop-serve under twice its capacity, on loopback, bounded in time and in requests.

1. capacity: closed loop, --concurrency clients sending --images encoded images per request, --capacity-seconds;
2. overload: open loop at --overload x that rate (fixed arrival times, as independent clients would send)
   for --seconds, each request with a --deadline; a health check every 100 ms on its own connection;
3. right after: one request, which must be answered OK.
Reports (one JSON object on stdout): answers by status code, never answered (the client's deadline ran out
first), latency p50/p99 of OK answers and of RESOURCE_EXHAUSTED refusals, health-check latency under load,
the server's RSS (start, peak, end), and the request right after. Exit code 1 when a target is missed:
no request unanswered, health p99 < 100 ms, refusals p99 < 100 ms, service right after.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving import start_server

from atop_proto import grpc_service_pb2 as pb
from atop_proto import grpc_service_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def request(model: str, images: int) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="IMAGE", datatype="BYTES", shape=[images, 1])
    message.raw_input_contents.append(b"".join(len(j).to_bytes(4, "little") + j for j in map(jpeg, range(images))))
    return message


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None  # milliseconds


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def timed_infer(stub, message: pb.ModelInferRequest, deadline: float) -> tuple[str, str, float]:
    """The status code name of one request, its message and how long its answer took."""
    started = time.monotonic()
    try:
        await stub.ModelInfer(message, timeout=deadline)
        code, details = "OK", ""
    except grpc.aio.AioRpcError as error:
        code, details = error.code().name, error.details() or ""
    return code, details, time.monotonic() - started


async def capacity(stub: pb_grpc.GRPCInferenceServiceStub, message: pb.ModelInferRequest, args) -> float:
    """Requests per second that the server sustains in a closed loop."""
    done = 0
    until = time.monotonic() + args.capacity_seconds

    async def client() -> None:
        nonlocal done
        while time.monotonic() < until:
            await stub.ModelInfer(message, timeout=args.deadline)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    return done / (time.monotonic() - started)


async def overload(stub, health, message, rate: float, pid: int, args) -> dict:
    codes: Counter[str] = Counter()
    example: dict[str, str] = {}  # the first message of each failing code: says who refused, and why
    latency: dict[str, list[float]] = {"OK": [], "RESOURCE_EXHAUSTED": []}
    health_latency: list[float] = []
    health_failures: Counter[str] = Counter()  # by status code
    rss = [rss_mb(pid)]
    stop = asyncio.Event()

    async def one() -> None:
        code, details, seconds = await timed_infer(stub, message, args.deadline)
        codes[code] += 1
        if details:
            example.setdefault(code, details)
        latency.setdefault(code, []).append(seconds)

    async def probe() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                health_latency.append(time.monotonic() - started)
            except grpc.aio.AioRpcError as error:
                health_failures[error.code().name] += 1
                example.setdefault("health " + error.code().name, error.details() or "")
            rss.append(rss_mb(pid))
            await asyncio.sleep(0.1)

    prober = asyncio.ensure_future(probe())
    tasks = []
    started = time.monotonic()
    for i in range(int(rate * args.seconds)):
        await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    stop.set()
    await prober
    return {
        "offered_requests_per_second": round(rate, 1),
        "requests": len(tasks),
        "codes": dict(codes),
        "messages": example,
        "unanswered": codes.get("DEADLINE_EXCEEDED", 0),
        "ok_ms": {"p50": percentile(latency["OK"], 50), "p99": percentile(latency["OK"], 99)},
        "refused_ms": {
            "p50": percentile(latency["RESOURCE_EXHAUSTED"], 50),
            "p99": percentile(latency["RESOURCE_EXHAUSTED"], 99),
        },
        "health_ms": {
            "p50": percentile(health_latency, 50),
            "p99": percentile(health_latency, 99),
            "max": percentile(health_latency, 100),
        },
        "health_failures": dict(health_failures),
        "rss_mb": {"start": round(rss[0]), "peak": round(max(rss)), "end": round(rss_mb(pid))},
    }


async def measure(address: str, pid: int, args) -> dict:
    message = request(args.model, args.images)
    async with grpc.aio.insecure_channel(address) as channel, grpc.aio.insecure_channel(address) as probes:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        rate = await capacity(stub, message, args)
        report = {"capacity_requests_per_second": round(rate, 1), "images_per_request": args.images}
        report["overload"] = await overload(
            stub, health_pb2_grpc.HealthStub(probes), message, rate * args.overload, pid, args
        )
        code, _, seconds = await timed_infer(stub, message, args.deadline)
        report["right_after"] = {"code": code, "ms": round(seconds * 1000, 1)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=REPO / "model_repository")
    parser.add_argument("--model", default="atop_cifar10")
    parser.add_argument("--images", type=int, default=8, help="encoded images per request")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients measuring capacity")
    parser.add_argument("--capacity-seconds", type=float, default=15.0)
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of the open-loop overload")
    parser.add_argument("--overload", type=float, default=2.0, help="offered load as a multiple of capacity")
    parser.add_argument("--deadline", type=float, default=30.0, help="per request, seconds")
    parser.add_argument("server_args", nargs="*", help="extra atop-serve options (after --)")
    args = parser.parse_args()
    server = start_server(args.model_repository, "--models", args.model, *args.server_args)
    try:
        report = asyncio.run(measure(server.address, server.process.pid, args))
    finally:
        report_exit = server.stop()
    report["server_exit_code"] = report_exit
    print(json.dumps(report, indent=1))
    overloaded = report["overload"]
    missed = [
        name
        for name, failed in (
            ("unanswered requests", overloaded["unanswered"] > 0),
            ("health p99 >= 100 ms", (overloaded["health_ms"]["p99"] or 0) >= 100 or overloaded["health_failures"]),
            ("refusal p99 >= 100 ms", (overloaded["refused_ms"]["p99"] or 0) >= 100),
            ("no service right after", report["right_after"]["code"] != "OK"),
            ("server exit code", report_exit != 0),
        )
        if failed
    ]
    if missed:
        print("missed: " + ", ".join(missed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
