"""The serving core without gRPC: a real exported model, its batcher, deadlines, cancellation, validation,
and the bounds on decoding (pixels per request and in flight), driven from asyncio as the servicers do."""

import asyncio
import io
import time

import numpy as np
import pytest
from PIL import Image

from atop_server.batcher import BatcherConfig
from atop_server.core import Call, CoreConfig, InferenceCore
from atop_server.errors import DeadlineExceeded, InvalidInput, NotReady, Overloaded
from atop_server.repository import ModelNotFoundError


def png(size: int, seed: int = 0) -> bytes:
    """A PNG of noise (incompressible: decoding it costs what its pixel count says)."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def core(tiny_repository):
    config = CoreConfig(
        tiny_repository,
        decode_workers=2,
        max_request_pixels=4_000_000,
        max_pixels_in_flight=6_000_000,
        batcher=BatcherConfig(max_batch_size=16, max_queue_size=4096, max_client_queue_size=512),
    )
    running = InferenceCore(config)
    with pytest.raises(NotReady):
        asyncio.run(running.classify(None, np.zeros((1, 3, 32, 32), np.float32), 1, Call()))  # type: ignore[arg-type]
    running.start()
    yield running
    running.close()


def test_probabilities_draws_and_layouts(core):
    model = core.model("tiny")
    images = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    probabilities = asyncio.run(core.classify(model, images, 3, Call()))
    assert probabilities.shape == (5, 10) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    decoded = (images.transpose(0, 2, 3, 1) * 255).astype(np.uint8)
    assert asyncio.run(core.classify(core.model("tiny_uint8"), decoded, 1, Call())).shape == (5, 10)
    assert asyncio.run(core.classify(model, decoded, 1, Call())).shape == (5, 10)  # UINT8 to a float model
    with pytest.raises(InvalidInput, match="draws must be between 1 and 16"):
        asyncio.run(core.classify(model, images, 17, Call()))


def test_requests_larger_than_a_batch_are_split_and_reassembled(core):
    model = core.model("tiny")
    images = np.random.default_rng(1).random((40, 3, 32, 32), dtype=np.float32)  # 3 executions of <= 16
    before = model.stats.execution_count
    assert asyncio.run(core.classify(model, images, 1, Call())).shape == (40, 10)
    assert model.stats.execution_count - before >= 3


def test_what_can_never_be_queued_is_invalid_before_anything_runs(core):
    model = core.model("tiny")
    before = model.stats.execution_count
    images = np.zeros((64, 3, 32, 32), np.float32)
    with pytest.raises(InvalidInput, match=r"64 images x 9 draws = 576 model inputs exceed the 512"):
        asyncio.run(core.classify(model, images, 9, Call()))
    assert model.stats.execution_count == before


def test_deadline_and_cancellation_withdraw_the_work(core):
    model = core.model("tiny")
    images = np.random.default_rng(2).random((16, 3, 32, 32), dtype=np.float32)
    with pytest.raises(DeadlineExceeded):
        asyncio.run(core.classify(model, images, 16, Call(deadline=time.monotonic() + 0.001)))

    async def cancel_while_queued() -> None:
        task = asyncio.ensure_future(core.classify(model, images, 16, Call()))
        await asyncio.sleep(0)  # it submits its parts and waits
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_while_queued())
    assert asyncio.run(core.classify(model, images[:1], 1, Call())).shape == (1, 10)  # and the core goes on


def test_decoding_checks_the_deadline_between_images(core):
    with pytest.raises(DeadlineExceeded, match="while its images were decoded"):
        asyncio.run(core.decode([png(32)] * 4, 32, Call(deadline=time.monotonic())))


def test_a_cancelled_request_decodes_no_further_image(core):
    """16 large PNGs; the request is cancelled after its first image: the rest are never decoded."""
    images = [png(480, seed) for seed in range(16)]  # 230k pixels each: 3.7 M in all, under the limit

    async def cancel_after_first_image() -> int:
        start = core.decoded_images
        task = asyncio.ensure_future(core.decode(images, 32, Call()))
        while core.decoded_images == start:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # Whatever the pool still had of it (at most one image per lane) has run or been cancelled by now:
        await asyncio.wrap_future(core._decoder.submit(lambda: None))
        return core.decoded_images - start

    assert asyncio.run(cancel_after_first_image()) <= 1 + core.config.decode_workers


def test_decoded_pixels_are_bounded_per_request_and_in_flight(core):
    with pytest.raises(InvalidInput, match=r"hold 4147200 pixels, above the limit of 4000000 per request"):
        asyncio.run(core.decode([png(720)] * 8, 32, Call()))  # 8 x 518,400 pixels

    async def two_at_once() -> None:
        first = asyncio.ensure_future(core.decode([png(700, s) for s in range(8)], 32, Call()))  # 3.9 M
        await asyncio.sleep(0)
        while core._pixels_in_flight.used == 0:  # the first holds its pixels once its headers are read
            await asyncio.sleep(0.001)
        with pytest.raises(Overloaded, match="pixels are being decoded"):
            await core.decode([png(700, s) for s in range(8)], 32, Call())
        assert (await first).shape == (8, 32, 32, 3)

    asyncio.run(two_at_once())
    assert core._pixels_in_flight.used == 0


def test_validation_messages(core):
    model = core.model("tiny")
    with pytest.raises(InvalidInput, match="no images"):
        core.validate_pixels(model, np.zeros((0, 3, 32, 32), np.float32))
    with pytest.raises(InvalidInput, match=r"UINT8 images must be \[N,32,32,3\]"):
        core.validate_pixels(model, np.zeros((1, 3, 32, 32), np.uint8))
    with pytest.raises(InvalidInput, match="float64"):
        core.validate_pixels(model, np.zeros((1, 3, 32, 32), np.float64))
    with pytest.raises(InvalidInput, match="image 0 is empty"):
        asyncio.run(core.decode([b""], 32, Call()))
    with pytest.raises(InvalidInput, match=r"image 0 \(1 bytes\) is not in a known image format"):
        asyncio.run(core.decode([b"\x00", b""], 32, Call()))  # the first bad image is the one reported
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'"):
        core.model("nope")
    assert core.model("").name == "tiny"  # the default: the first served model


def test_a_single_image_is_bounded_and_decoded_in_one_trip_to_the_pool(core):
    """One-image requests take their own path (header check, pixel budget and decoding in one pool task):
    the same deadline, per-request and in-flight bounds hold there."""
    with pytest.raises(DeadlineExceeded, match="before its image was decoded"):
        asyncio.run(core.decode([png(32)], 32, Call(deadline=time.monotonic())))
    with pytest.raises(InvalidInput, match=r"hold 4410000 pixels, above the limit of 4000000 per request"):
        asyncio.run(core.decode([png(2100)], 32, Call()))
    with pytest.raises(InvalidInput, match="image 0"):
        asyncio.run(core.decode([b"not an image"], 32, Call()))

    async def beside_a_large_request() -> None:
        first = asyncio.ensure_future(core.decode([png(700, s) for s in range(8)], 32, Call()))  # 3.9 M pixels
        while core._pixels_in_flight.used == 0:
            await asyncio.sleep(0.001)
        with pytest.raises(Overloaded, match="pixels are being decoded"):
            await core.decode([png(1500)], 32, Call())  # 2.25 M more: over the 6 M in flight
        await first

    asyncio.run(beside_a_large_request())
    decoded = core.decoded_images
    assert asyncio.run(core.decode([png(64)], 32, Call())).shape == (1, 32, 32, 3)
    assert core.decoded_images == decoded + 1 and core._pixels_in_flight.used == 0
