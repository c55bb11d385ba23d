"""onnxruntime sessions for randomized models: every session draws its own random sequence.

onnxruntime's random ops (RandomNormalLike, RandomUniformLike) without a `seed` attribute take their seed
from a process-wide default when the session is created: two sessions created in one process repeat each
other's draws exactly (docs/design.md section 5). A randomized defense whose draws an attacker can predict is
no defense, so every session is created right after reseeding that default from the OS's entropy pool.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

_SEED_LOCK = threading.Lock()  # set_seed + session creation must not interleave between threads

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,  # measured: ResNet-18 150 -> 202 img/s on 2 cores
}


def create_session(
    model: str | Path | bytes,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    optimization_level: str = "all",
    intra_op_threads: int = 0,
) -> ort.InferenceSession:
    """A session whose random ops are seeded from OS entropy (never repeating another session's draws)."""
    if optimization_level not in OPTIMIZATION_LEVELS:
        raise ValueError(f"optimization_level must be one of {sorted(OPTIMIZATION_LEVELS)}, got {optimization_level!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization_level]
    options.intra_op_num_threads = intra_op_threads
    # Idle worker threads spinning burned 1.5 cores at low load (docs/design.md section 5): let them sleep.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    with _SEED_LOCK:
        ort.set_seed(secrets.randbits(62))
        return ort.InferenceSession(source, sess_options=options, providers=list(providers))
