#!/usr/bin/env bash
# make container-test: build the serving image with podman, run it, classify CIFAR-10 test images through it
# with atop-classify, check its health, stop it with SIGTERM and check that it exited 0.
#   BASE_IMAGE=...   base of the serving image (default: the local Python base of ../shared/container)
#   IMAGES=N         CIFAR-10 test images to classify (default 200)
#   MIN_ACCURACY=A   fail below this accuracy (default 0.76: the shipped model's 86.0% less ~3.6 standard
#                    deviations of 200 images' sampling and RT randomness; see models/zoo/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_IMAGE=${BASE_IMAGE:-localhost/python:3.11-slim-bookworm}
IMAGES=${IMAGES:-200}
MIN_ACCURACY=${MIN_ACCURACY:-0.76}
SHARED=../shared
TAG=localhost/atop-serve:container-test
NAME=atop-container-test-$$
PORT=${PORT:-18501}
RUN="${RUN:-uv run --frozen}"
work=$(mktemp -d)
cleanup() { podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

[ -d model_repository ] || { echo "container-test: no model_repository/ to ship (run make export)" >&2; exit 2; }
command -v podman >/dev/null || bash "$SHARED/container/setup-podman.sh"
podman image exists "$BASE_IMAGE" || bash "$SHARED/container/setup-podman.sh"
# --format docker: the OCI format drops HEALTHCHECK, which docker and podman run from the image.
bash "$SHARED/container/build-args.sh" podman build --format docker -t "$TAG" --build-arg BASE_IMAGE="$BASE_IMAGE" \
    --build-arg TRAINER_BASE="$BASE_IMAGE" .
echo "image size: $(podman images "$TAG" --format '{{.Size}}')"

podman run -d --name "$NAME" --network host -e ATOP_HOST=127.0.0.1 -e ATOP_PORT="$PORT" \
    -e ATOP_METRICS_PORT=$((PORT + 1)) "$TAG" >/dev/null
for _ in $(seq 120); do
  podman exec "$NAME" python -m atop_server.healthcheck --address "127.0.0.1:$PORT" >/dev/null 2>&1 && break
  sleep 1
done
podman exec "$NAME" python -m atop_server.healthcheck --address "127.0.0.1:$PORT"
podman healthcheck run "$NAME" && echo "image HEALTHCHECK: ok"

$RUN python - "$SHARED/datasets/cifar10-jpg.tar.gz" "$work/cifar" "$IMAGES" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import extract_cifar_slice
extract_cifar_slice(Path(sys.argv[2]), {"test": max(1, int(sys.argv[3]) // 10)})
PY
$RUN atop-classify "$work/cifar/test" --server "127.0.0.1:$PORT" --format csv -o "$work/out.csv" 2> "$work/summary"
tail -n 1 "$work/summary"
tail -n 1 "$work/summary" | $RUN python -c "import json, sys; a = json.load(sys.stdin)['accuracy']; \
sys.exit(0 if a >= $MIN_ACCURACY else f'accuracy {a} below $MIN_ACCURACY')"
curl -sf "http://127.0.0.1:$((PORT + 1))/metrics" | grep -q '^atop_requests_total' && echo "metrics: ok"

podman stop -t 60 "$NAME" >/dev/null
code=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
podman logs "$NAME" 2>&1 | tail -n 2
[ "$code" = 0 ] || { echo "container exited $code after SIGTERM" >&2; exit 1; }
echo "container-test: passed"
