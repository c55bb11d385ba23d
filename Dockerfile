# AToP Serve images (multi-stage). Targets:
#   serve    (default) the gRPC server + the shipped model repository; onnxruntime-gpu, no torch, no compilers
#            podman build -t atop-serve .
#            podman run --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 atop-serve
#   trainer  PyTorch (CUDA build from PyPI) + atop-train / atop-export / atop-eval, for GPU training jobs
#            podman build --target trainer -t atop-trainer .
#
# BASE_IMAGE (serving): an NVIDIA CUDA 13 runtime with cuDNN 9, the libraries onnxruntime-gpu 1.31 loads (with
# CUDA 12 it logs "Require cuDNN 9.* and CUDA 13.*" and falls back to the CPU); any glibc Linux with
# python3 >= 3.11 works too (then on the CPU). TRAINER_BASE: any such Linux:
# the PyTorch wheels carry their own CUDA. Without a registry, pass local bases, e.g.
#   --build-arg BASE_IMAGE=localhost/python:3.11-slim-bookworm (see ../shared/container/README.md).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG TRAINER_BASE=python:3.11-slim-bookworm

# ---- uv and the workspace manifests, on a given base ------------------------------------------------------
FROM ${BASE_IMAGE} AS serve-base
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Python from the distro when the base has none (CUDA runtime images), in a venv (no PEP 668 trouble).
# The python3 version is whatever BASE_IMAGE's distribution ships: pinning one would break other bases.
# hadolint ignore=DL3008
RUN if ! python3 -m venv /opt/venv 2>/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/* \
      && python3 -m venv /opt/venv; \
    fi

FROM ${TRAINER_BASE} AS python-base
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1 UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/venv
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
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
COPY proto/pyproject.toml proto/

# ---- trainer ----------------------------------------------------------------------------------------------
FROM python-base AS trainer
# A build-time CA bundle (a TLS-intercepting proxy) is used when mounted there; elsewhere this is a no-op.
RUN if [ -s /run/host-ca.crt ]; then export SSL_CERT_FILE=/run/host-ca.crt; fi \
    && uv sync --frozen --no-dev --package atop-export --no-install-workspace
COPY models/ models/
COPY export/ export/
COPY server/ server/
COPY proto/ proto/
RUN if [ -s /run/host-ca.crt ]; then export SSL_CERT_FILE=/run/host-ca.crt; fi \
    && uv sync --frozen --no-dev --package atop-export --no-editable \
    && useradd --create-home --uid 10001 atop \
    && mkdir -p /runs /data && chown atop /runs /data
USER 10001
WORKDIR /runs
ENV PATH=/opt/venv/bin:$PATH
ENTRYPOINT ["atop-train"]
CMD ["--help"]

# ---- the serving virtualenv, built with uv from the lock, then onnxruntime swapped for its GPU build ------
FROM serve-base AS serve-build
COPY --from=python-base /opt/uv /opt/uv
COPY --from=python-base /app /app
WORKDIR /app
COPY server/ server/
COPY proto/ proto/
ENV UV_NO_CACHE=1 UV_PYTHON_DOWNLOADS=never UV_LINK_MODE=copy UV_PROJECT_ENVIRONMENT=/opt/venv
# onnxruntime-gpu has the CPU provider too; its newest release trails the CPU build's by one minor version.
RUN if [ -s /run/host-ca.crt ]; then export SSL_CERT_FILE=/run/host-ca.crt PIP_CERT=/run/host-ca.crt; fi \
    && /opt/uv/bin/uv sync --frozen --no-dev --package atop-server --no-editable --python /opt/venv/bin/python3 \
    && /opt/uv/bin/uv pip uninstall --python /opt/venv/bin/python3 onnxruntime \
    && /opt/uv/bin/uv pip install --python /opt/venv/bin/python3 onnxruntime-gpu==1.31.1

# ---- serve (the default target) ---------------------------------------------------------------------------
FROM serve-base AS serve
COPY --from=serve-build /opt/venv /opt/venv
COPY model_repository/ /models/
RUN useradd --create-home --uid 10001 atop
USER 10001
ENV PATH=/opt/venv/bin:$PATH \
    ATOP_MODEL_REPOSITORY=/models ATOP_HOST=0.0.0.0 ATOP_HTTP_PORT=8000 ATOP_PORT=8001 \
    ATOP_METRICS_HOST=0.0.0.0 ATOP_METRICS_PORT=8002
# TLS and tokens: ATOP_GRPC_USE_SSL=true ATOP_GRPC_SERVER_CERT=... ATOP_GRPC_SERVER_KEY=... ATOP_AUTH_TOKEN_FILE=...
# (files mounted from secrets, SECURITY.md); ATOP_HEALTH_PORT=8003 then serves plaintext health for probes
# and for HEALTHCHECK below.
EXPOSE 8000 8001 8002 8003
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["python", "-m", "atop_server.healthcheck"]
STOPSIGNAL SIGTERM
# The server handles SIGTERM itself (drain, then exit 0), also as PID 1.
ENTRYPOINT ["atop-serve"]
