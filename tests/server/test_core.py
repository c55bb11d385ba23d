"""The serving core without gRPC: a real exported model, its batcher, deadlines, cancellation, validation."""

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from atop_server.batcher import BatcherConfig
from atop_server.core import CoreConfig, InferenceCore
from atop_server.errors import Cancelled, DeadlineExceeded, InvalidInput, ModelNotFoundError, NotReady


@pytest.fixture(scope="module")
def core(tiny_repository):
    running = InferenceCore(CoreConfig(tiny_repository, batcher=BatcherConfig(max_batch_size=16, max_queue_size=4096)))
    with pytest.raises(NotReady):
        running.classify(None, np.zeros((1, 3, 32, 32), np.float32))  # type: ignore[arg-type]
    running.start()
    yield running
    running.close()


def test_probabilities_draws_and_layouts(core):
    model = core.model("tiny")
    images = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    probabilities = core.classify(model, images, draws=3)
    assert probabilities.shape == (5, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    decoded = (images.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    assert core.classify(core.model("tiny_uint8"), decoded).shape == (5, 10)
    assert core.classify(model, decoded).shape == (5, 10)  # UINT8 to a float model: converted exactly
    with pytest.raises(InvalidInput, match="draws must be between 1 and 16"):
        core.classify(model, images, draws=17)


def test_requests_larger_than_a_batch_are_split_and_reassembled(core):
    model = core.model("tiny")
    images = np.random.default_rng(1).random((40, 3, 32, 32), dtype=np.float32)  # 3 executions of <= 16
    before = model.stats.execution_count
    assert core.classify(model, images).shape == (40, 10)
    assert model.stats.execution_count - before >= 3


def test_deadline_and_cancellation_withdraw_the_work(core):
    model = core.model("tiny")
    images = np.random.default_rng(2).random((16, 3, 32, 32), dtype=np.float32)
    with pytest.raises(DeadlineExceeded):
        core.classify(model, images, draws=16, timeout=0.001)
    token: Future = Future()
    threading.Timer(0.01, token.set_result, args=(None,)).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        core.classify(model, images, draws=16, cancelled=token)
    assert time.monotonic() - started < 5
    assert core.classify(model, images[:1]).shape == (1, 10)  # and the core goes on


def test_validation_messages(core):
    model = core.model("tiny")
    with pytest.raises(InvalidInput, match="no images"):
        core.validate_pixels(model, np.zeros((0, 3, 32, 32), np.float32))
    with pytest.raises(InvalidInput, match=r"UINT8 images must be \[N,32,32,3\]"):
        core.validate_pixels(model, np.zeros((1, 3, 32, 32), np.uint8))
    with pytest.raises(InvalidInput, match="float64"):
        core.validate_pixels(model, np.zeros((1, 3, 32, 32), np.float64))
    with pytest.raises(InvalidInput, match="image 0 is empty"):
        core.decode([b""], 32)
    with pytest.raises(InvalidInput, match=r"image 0 \(1 bytes\) is not in a known image format"):
        core.decode([b"\x00", b""], 32)  # the first bad image is the one reported
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'"):
        core.model("nope")
    assert core.model("").name == "tiny"  # the default: the first served model
