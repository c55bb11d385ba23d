# AToP Serve. On a fresh machine with python3, pip and make: `make serve`, `make test`.
# uv is installed into .tools/ when it is not on PATH (a venv: no PEP 668 trouble with system Pythons).

SHELL := /bin/bash
UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)
RUN := $(UV) run --frozen

.PHONY: help install test lint serve format clean proto

help:
	@echo "make serve   start the gRPC server on the shipped default model"
	@echo "make test    lint + the whole test suite"
	@echo "make install create .venv with every workspace package (uv sync)"

$(CURDIR)/.tools/bin/uv:
	python3 -m venv $(CURDIR)/.tools
	$(CURDIR)/.tools/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

.venv/.synced: uv.lock pyproject.toml $(wildcard */pyproject.toml) | $(UV)
	$(UV) sync --frozen --all-packages
	touch $@

install: .venv/.synced

lint: install
	$(RUN) ruff check .
	$(RUN) ruff format --check models tests

test: lint
	$(RUN) pytest

format: install
	$(RUN) ruff check --fix .
	$(RUN) ruff format models tests

# Regenerate the Python code of proto/atop_proto/*.proto (committed; tests/test_proto.py fails when stale).
proto: install
	$(RUN) python -m atop_proto.generate proto

serve: install
	@echo "The gRPC server (atop-serve) is not built yet: see the open issue 'The gRPC inference server'." >&2
	@echo "Until then, train with: $(RUN) atop-train --help" >&2
	@exit 2

clean:
	rm -rf .venv .tools .pytest_cache .ruff_cache
