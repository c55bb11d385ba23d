"""Run atop-serve as a real process on ephemeral ports, as a deployment would; hold a server's model
executions at a gate, so that tests can act while a request is truly in flight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunningServer:
    process: subprocess.Popen
    grpc_port: int
    metrics_port: int
    http_port: int
    log: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self, timeout: float = 180) -> int:
        """SIGTERM, then the exit code; on a timeout the failure carries the server's log (a hung drain)."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise TimeoutError(
                f"atop-serve did not exit {timeout} s after SIGTERM:\n" + "".join(self.log[-40:])
            ) from None


def start_server(repository: Path, *args: str, timeout: float = 120) -> RunningServer:
    command = [
        sys.executable,
        "-m",
        "atop_server.cli",
        "--model-repository",
        str(repository),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--http-port",
        "0",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    log: list[str] = []
    started = time.monotonic()
    assert process.stderr is not None
    for line in process.stderr:
        log.append(line)
        if '"event": "serving"' in line:
            event = json.loads(line)
            break
        if time.monotonic() - started > timeout:
            process.kill()
            raise TimeoutError("atop-serve did not start:\n" + "".join(log))
    else:
        raise RuntimeError(f"atop-serve exited with {process.wait()}:\n" + "".join(log))
    # Keep draining its log so that the pipe never fills and blocks the server.
    threading.Thread(target=lambda: log.extend(process.stderr), daemon=True).start()  # type: ignore[arg-type]
    return RunningServer(process, event["grpc_port"], event["metrics_port"], event["http_port"], log)


class ExecutionGate:
    """An InferenceCore's on_execution observer that holds the batcher's worker at the first execution until
    opened, and records the images of every execution. The worker calls the observer after the model ran and
    before the answers go out, so a held execution is a request the server has started and not answered;
    what is submitted meanwhile waits in the queue, as behind a slow model."""

    def __init__(self, forward: Callable[[str, object], None] = lambda model, execution: None) -> None:
        self.forward = forward
        self.entered, self.opened = threading.Event(), threading.Event()
        self.images: list[int] = []  # per execution, in order

    def __call__(self, model: str, execution: object) -> None:
        self.images.append(execution.batch_size)  # type: ignore[attr-defined]
        self.entered.set()
        if not self.opened.wait(120):
            raise TimeoutError("the test never opened the gate")
        self.forward(model, execution)
