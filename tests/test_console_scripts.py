"""Every console script the workspace declares, and every subcommand of one, answers --help with exit 0."""

import contextlib
import importlib
import io
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MEMBERS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["uv"]["workspace"]["members"]


def console_scripts() -> dict[str, str]:
    scripts = {}
    for member in MEMBERS:
        scripts.update(tomllib.loads((REPO / member / "pyproject.toml").read_text())["project"].get("scripts", {}))
    return scripts


def help_text(entry_point: str, *args: str) -> str:
    """What `<script> *args --help` prints; fails the test unless it exits 0."""
    module, function = entry_point.split(":")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), function)([*args, "--help"])
    assert exit_info.value.code == 0, out.getvalue()
    return out.getvalue()


def subcommands(help_output: str) -> list[str]:
    """argparse lists a script's subcommands as a positional argument {a,b,c} (an option's choices look the
    same, but sit under options)."""
    positionals = help_output.partition("positional arguments:")[2].partition("options:")[0]
    found = re.search(r"^\s+\{([\w,-]+)\}", positionals, re.MULTILINE)
    return found.group(1).split(",") if found else []


def test_the_workspace_declares_every_command_and_subcommands_are_found():
    scripts = console_scripts()
    assert {"atop-train", "atop-eval", "atop-export", "atop-serve", "atop-classify"} <= set(scripts)
    assert {"classifier", "pretrain", "finetune"} <= set(subcommands(help_text(scripts["atop-train"])))
    assert subcommands(help_text(scripts["atop-classify"])) == []  # --format {csv,...} is no subcommand


@pytest.mark.parametrize("script", sorted(console_scripts()))
def test_help_of_every_command_and_subcommand_exits_0(script):
    entry_point = console_scripts()[script]
    top = help_text(entry_point)
    assert "usage:" in top
    for command in subcommands(top):
        assert f"usage: {script} {command}" in help_text(entry_point, command)
