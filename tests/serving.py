"""Run atop-serve as a real process on ephemeral ports, as a deployment would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
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
