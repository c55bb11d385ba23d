"""The Makefile's promises: `make help` names every target, and `make serve` installs only the serving side
and passes HOST, PORT and METRICS_PORT on to atop-serve."""

import json
import os
import re
import signal
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def phony_targets() -> list[str]:
    line = next(line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith(".PHONY:"))
    return line.split(":", 1)[1].split()


def make(*args: str) -> str:
    result = subprocess.run(["make", "-s", "-C", str(REPO), *args], capture_output=True, text=True, check=True)
    return result.stdout


def test_help_lists_every_target():
    listed = set(re.findall(r"^make ([\w-]+)", make("help"), re.MULTILINE))
    assert listed == set(phony_targets())


def test_serve_installs_the_serving_side_only():
    commands = make("-n", "serve")
    sync = next(line for line in commands.splitlines() if " sync " in line)
    assert "--package atop-server" in sync and "--package atop-clients" in sync and "--inexact" in sync
    assert "--all-packages" not in commands


def test_serve_takes_host_port_and_metrics_port(tiny_repository):
    variables = [f"MODEL_REPOSITORY={tiny_repository}", "HOST=127.0.0.1", "PORT=0", "HTTP_PORT=0", "METRICS_PORT=0"]
    process = subprocess.Popen(
        ["make", "-s", "-C", str(REPO), "serve", *variables],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group: make, uv and atop-serve stop together
    )
    assert process.stderr is not None
    log = []
    try:
        for line in process.stderr:
            log.append(line)
            if '"event": "serving"' in line:
                break
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(120)
    serving = json.loads(log[-1]) if log and '"serving"' in log[-1] else {}
    assert serving, "make serve did not start:\n" + "".join(log)
    assert serving["grpc"] == f"127.0.0.1:{serving['grpc_port']}" and serving["grpc_port"] > 0  # not 8001
    assert serving["metrics_port"] > 0 and serving["metrics_port"] != 8002 and "tiny" in serving["models"]
    assert serving["http_port"] > 0 and serving["http_port"] != 8000
