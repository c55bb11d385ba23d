"""The serving core's bookkeeping, seen through deterministic models (tests/echo_model.py) whose every output
row is known from its input: which rows a request gets back after its draws and parts went through shared
executions, and which work the model never runs because its request was cancelled or expired in the queue."""

import asyncio
import time

import numpy as np
import pytest
from echo_model import expected_probabilities
from serving import ExecutionGate

from atop_server.batcher import BatcherConfig
from atop_server.core import Call, CoreConfig, InferenceCore
from atop_server.errors import DeadlineExceeded


def distinct_images(count: int, seed: int) -> np.ndarray:
    """Images whose channel means all differ, so that no two rows of their answers are alike."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.05, 0.95, (count, 3, 1, 1)).astype(np.float32) * np.ones((1, 1, 32, 32), np.float32)


@pytest.fixture
def gated_core(echo_repository):
    gate = ExecutionGate()
    config = CoreConfig(echo_repository, models=("echo",), batcher=BatcherConfig(max_batch_size=4))
    core = InferenceCore(config, on_execution=gate)
    core.start()
    yield core, gate
    gate.opened.set()
    core.close()


def test_draws_are_averaged_per_image_across_parts_and_executions(echo_repository):
    # 5 images x 3 draws in parts of at most 2 images: 9 parts over several executions, each image's draws in
    # different ones. Averaging the wrong rows together mixes images, whose rows all differ.
    config = CoreConfig(echo_repository, models=("echo",), batcher=BatcherConfig(max_batch_size=2))
    core = InferenceCore(config)
    core.start()
    try:
        images = distinct_images(5, seed=1)
        probabilities = asyncio.run(core.classify(core.model("echo"), images, 3, Call()))
    finally:
        core.close()
    np.testing.assert_allclose(probabilities, expected_probabilities(images), atol=1e-6)


def test_uint8_pixels_reach_a_float_model_in_its_layout_and_scale(gated_core):
    core, gate = gated_core
    gate.opened.set()
    pixels = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    probabilities = asyncio.run(core.classify(core.model("echo"), pixels, 1, Call()))
    unit = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.testing.assert_allclose(probabilities, expected_probabilities(unit), atol=1e-6)


def test_queued_work_of_cancelled_and_expired_requests_never_runs(gated_core):
    core, gate = gated_core
    model = core.model("echo")

    async def scenario() -> None:
        blocker = asyncio.ensure_future(core.classify(model, distinct_images(1, 3), 1, Call(client="a")))
        await asyncio.to_thread(gate.entered.wait, 60)  # the worker holds the blocker: whatever comes next waits
        cancelled = asyncio.ensure_future(core.classify(model, distinct_images(4, 4), 4, Call(client="b")))
        while model.batcher.queued_images < 16:  # its 4 parts are queued
            await asyncio.sleep(0.001)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        deadline = time.monotonic() + 0.2
        with pytest.raises(DeadlineExceeded, match="no answer within the request's deadline"):
            await core.classify(model, distinct_images(3, 5), 1, Call(client="c", deadline=deadline))
        gate.opened.set()
        await blocker
        after = distinct_images(2, 6)
        np.testing.assert_allclose(
            await core.classify(model, after, 1, Call(client="d")), expected_probabilities(after), atol=1e-6
        )

    asyncio.run(scenario())
    # The blocker's image and the last request's two: not one image of the cancelled or the expired request.
    assert gate.images == [1, 2]
    assert model.batcher.queued_images == 0
