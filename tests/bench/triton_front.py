"""C of make bench: a real NVIDIA Triton (tritonserver from the nvidia-pytriton wheel) serving the same ONNX file
behind a Pillow-decoding Python front, with Triton's dynamic batcher as the repository's config.pbtxt sets it.

  .venv-bench/bin/python tests/bench/triton_front.py --model-repository model_repository --model atop_cifar10

Runs in its own environment (the `bench` dependency group: pytriton needs numpy < 2). Decoding and the
onnxruntime session are atop-serve's own (atop_server.codec, atop_server.session), so C and S do the same work
per image and differ only in what surrounds it. Once the model is loaded it writes one JSON line
{"event": "serving", "grpc_port": ...} to stdout, or to the file descriptor --ready-fd names: tritonserver's
own log reaches stdout through pytriton's reader threads, and a line written there can land in the middle of
one of its lines. Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import sysconfig
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig

from atop_server.codec import decode_image
from atop_server.repository import load_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _queue_delay_us(config: Path) -> int:
    """The dynamic batcher's delay of the repository's own config.pbtxt (what a Triton deployment runs)."""
    found = re.search(r"max_queue_delay_microseconds:\s*(\d+)", config.read_text())
    return int(found.group(1)) if found else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--model", default="atop_cifar10")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--ready-fd", type=int, default=1, help="where the serving line goes (default: stdout)")
    args = parser.parse_args()

    loaded = load_model(args.model_repository, args.model)  # the server's own session settings and seeding
    size, layout = int(loaded.input_spec["height"]), loaded.input_spec["layout"]
    input_name, output_name = loaded.inputs[0].name, loaded.outputs[0].name

    @batch
    def infer(IMAGE: np.ndarray) -> dict[str, np.ndarray]:
        pixels = np.stack([decode_image(bytes(row[0]), size, i) for i, row in enumerate(IMAGE)])
        if layout == "NCHW":
            pixels = pixels.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        return {"PROBABILITIES": loaded.session.run([output_name], {input_name: pixels})[0]}

    # pytriton's Python backend stub is linked against libpython3.X.so and, without this, loads the system's
    # copy of a different patch release than this interpreter's standard library (the stub then fails with
    # "'_thread.RLock' object has no attribute '_recursion_count'").
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
        filter(None, [sysconfig.get_config_var("LIBDIR"), os.environ.get("LD_LIBRARY_PATH")])
    )
    loopback = "127.0.0.1"  # pytriton's default is every interface
    config = TritonConfig(
        grpc_address=loopback,
        grpc_port=_free_port(),
        http_address=loopback,
        http_port=_free_port(),
        allow_metrics=False,
    )
    delay = _queue_delay_us(args.model_repository / args.model / "config.pbtxt")
    # ModelStatistics open, as atop-serve's is: the bench reads queue and compute times from both servers.
    security = TritonSecurityConfig(restricted_endpoints=[e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"])
    with Triton(config=config, security_config=security) as triton:
        triton.bind(
            model_name=args.model,
            infer_func=infer,
            inputs=[Tensor(name=input_name, dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="PROBABILITIES", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size, batcher=DynamicBatcher(max_queue_delay_microseconds=delay)
            ),
            strict=False,
        )
        triton.run()
        serving = json.dumps({"event": "serving", "grpc_port": config.grpc_port, "queue_delay_us": delay})
        os.write(args.ready_fd, (serving + "\n").encode())  # one write: nothing else can land inside it
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
    sys.exit(0)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # left for sigwait, not handlers
    main()
