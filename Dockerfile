# AToP Serve images. Targets:
#   trainer  PyTorch (CUDA build from PyPI) + atop-train, for GPU training jobs:
#            podman build --target trainer -t atop-trainer .
#            podman run --gpus all -v $PWD/runs:/runs -v /data:/data atop-trainer classifier --out /runs/c ...
# The serving image (no torch) is added by the containerized-deployment issue.
#
# BASE_IMAGE: any glibc Linux with python3 >= 3.11 or apt. The PyTorch wheels carry their own CUDA libraries,
# so the host's NVIDIA container toolkit (the driver) is all a GPU run needs. Without a registry, pass a
# local base: --build-arg BASE_IMAGE=localhost/python:3.11-slim-bookworm (see ../shared/container/README.md).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS python-base
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1 UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/venv
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Python from the distro when the base has none, then uv in its own venv (no PEP 668 trouble anywhere).
RUN if ! python3 -m venv /opt/uv 2>/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/* \
      && python3 -m venv /opt/uv; \
    fi \
    && /opt/uv/bin/pip install --no-cache-dir uv==0.13.9 \
    && ln -s /opt/uv/bin/uv /usr/local/bin/uv
WORKDIR /app
# Lock and member manifests first: the dependency layer is rebuilt only when they change.
COPY pyproject.toml uv.lock README.md ./
COPY models/pyproject.toml models/
COPY export/pyproject.toml export/
COPY server/pyproject.toml server/
COPY clients/pyproject.toml clients/

FROM python-base AS trainer
# A build-time CA bundle (a TLS-intercepting proxy) is used when mounted there; elsewhere this is a no-op.
RUN if [ -s /run/host-ca.crt ]; then export SSL_CERT_FILE=/run/host-ca.crt; fi \
    && uv sync --frozen --no-dev --package atop-models --no-install-workspace
COPY models/ models/
RUN if [ -s /run/host-ca.crt ]; then export SSL_CERT_FILE=/run/host-ca.crt; fi \
    && uv sync --frozen --no-dev --package atop-models \
    && useradd --create-home --uid 10001 atop \
    && mkdir -p /runs /data && chown atop /runs /data
USER atop
WORKDIR /runs
ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT ["atop-train"]
CMD ["--help"]
