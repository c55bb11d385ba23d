"""atop-serve's argument parsing has no side effect: the log level travels in the config, main sets logging up."""

import logging

import pytest

from atop_server.cli import parse_args


def test_parsing_leaves_logging_alone_and_carries_the_level(tmp_path, monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh process, where basicConfig would add one
    config = parse_args(["--model-repository", str(tmp_path), "--log-level", "debug"])
    assert config.log_level == "DEBUG"
    assert root.handlers == []


def test_the_default_level_is_info(tmp_path, monkeypatch):
    monkeypatch.delenv("ATOP_LOG_LEVEL", raising=False)
    assert parse_args(["--model-repository", str(tmp_path)]).log_level == "INFO"
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", str(tmp_path), "--log-level", "chatty"])
