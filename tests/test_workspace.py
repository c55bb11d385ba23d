"""The workspace's promises: the serving side installs without torch, and the lock file is in step."""

import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def closure(lock: dict, name: str) -> set[str]:
    packages = {p["name"]: p for p in lock["package"]}
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo += [d["name"] for d in packages[current].get("dependencies", [])]
    return seen


@pytest.mark.parametrize("package", ["atop-server", "atop-clients"])
def test_serving_side_installs_without_torch(package):
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    needed = closure(lock, package)
    assert "grpcio" in needed
    assert not {n for n in needed if n in ("torch", "torchvision", "atop-models") or n.startswith("nvidia-")}


def test_trainer_declares_torch():
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    assert {"torch", "torchvision", "safetensors"} <= closure(lock, "atop-models")


def test_lock_file_matches_the_pyproject_files():
    uv = next((p for p in (REPO / ".tools" / "bin" / "uv", Path("/usr/local/bin/uv")) if p.exists()), "uv")
    result = subprocess.run([str(uv), "lock", "--check", "--offline"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_root_depends_on_every_member_so_uv_run_finds_every_command():
    """`uv run atop-train` on a fresh clone syncs the root project first: its dependencies are what gets installed."""
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    members = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["uv"]["workspace"]["members"]
    names = {tomllib.loads((REPO / m / "pyproject.toml").read_text())["project"]["name"] for m in members}
    assert names <= closure(lock, "atop-serve")
