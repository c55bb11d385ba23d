"""The client side of make bench: closed-loop stock tritonclient.grpc.aio clients sending JPEG BYTES requests,
the same for atop-serve and for Triton; and the servers' own statistics over the same window."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc.aio as triton


@dataclass(frozen=True)
class Load:
    name: str
    clients: int
    images: int  # per request

    def in_process_batch(self, max_batch_size: int) -> int:
        """The largest batch this load can put in front of the model: what in-process A runs for it."""
        return min(self.clients * self.images, max_batch_size)


LOADS = (
    Load("c1", 1, 1),
    Load("c8", 8, 1),
    Load("c64", 64, 1),
    Load("8x16", 8, 16),
)


@dataclass
class Sample:
    """One system at one load for one round; rounds of a system are pooled (`merge`)."""

    images: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)  # per request (per call in-process)
    server: dict[str, float] = field(default_factory=dict)  # ModelStatistics deltas, seconds and counts

    def merge(self, other: Sample) -> None:
        self.images += other.images
        self.seconds += other.seconds
        self.latencies_ms += other.latencies_ms
        for key, value in other.server.items():
            self.server[key] = self.server.get(key, 0.0) + value

    def summary(self) -> dict[str, float]:
        ms = sorted(self.latencies_ms)
        return {
            "images_per_second": self.images / self.seconds if self.seconds else 0.0,
            "p50_ms": statistics.median(ms) if ms else float("nan"),
            "p99_ms": ms[int(0.99 * (len(ms) - 1))] if ms else float("nan"),
            "mean_ms": statistics.fmean(ms) if ms else float("nan"),
            "calls": len(ms),
        }


def bytes_input(jpegs: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("IMAGE", [len(jpegs), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(jpegs, dtype=object).reshape(-1, 1))
    return tensor


async def _statistics(client: triton.InferenceServerClient, model: str) -> dict[str, float]:
    """Cumulative queue / compute / success times and counts, Triton's ModelStatistics (both servers have it)."""
    stats = (await client.get_inference_statistics(model, as_json=True))["model_stats"][0]
    inference = stats["inference_stats"]

    def seconds(name: str) -> float:
        return int(inference.get(name, {}).get("ns", 0)) / 1e9

    return {
        "requests": float(inference.get("success", {}).get("count", 0)),
        "executions": float(stats.get("execution_count", 0)),
        "inferences": float(stats.get("inference_count", 0)),
        "success_seconds": seconds("success"),
        "queue_seconds": seconds("queue"),
        "compute_seconds": seconds("compute_input") + seconds("compute_infer") + seconds("compute_output"),
    }


async def drive(address: str, model: str, load: Load, jpegs: list[bytes], seconds: float) -> Sample:
    """`load.clients` clients, each on its own connection, each with one request in flight at a time for
    `seconds`; connections are opened and warmed before the clock starts."""
    requests = [bytes_input(jpegs[i : i + load.images]) for i in range(0, len(jpegs) - load.images + 1, load.images)]
    clients = [triton.InferenceServerClient(address) for _ in range(load.clients)]
    try:
        await asyncio.gather(*(c.infer(model, [requests[i % len(requests)]]) for i, c in enumerate(clients)))
        before = await _statistics(clients[0], model)
        latencies: list[float] = []
        started = time.perf_counter()
        stop = started + seconds

        async def closed_loop(index: int, client: triton.InferenceServerClient) -> None:
            sent = index * 997  # clients start at different images (997: prime, so they stay apart)
            while time.perf_counter() < stop:
                request = requests[sent % len(requests)]
                sent += 1
                t = time.perf_counter()
                await client.infer(model, [request])
                latencies.append((time.perf_counter() - t) * 1000)

        await asyncio.gather(*(closed_loop(i, c) for i, c in enumerate(clients)))
        elapsed = time.perf_counter() - started
        after = await _statistics(clients[0], model)
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    server = {key: after[key] - before[key] for key in after}
    return Sample(len(latencies) * load.images, elapsed, latencies, server)
