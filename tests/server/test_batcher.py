"""The dynamic batcher on its own, with a real (numpy) model function."""

import threading
import time

import numpy as np
import pytest
from prometheus_client import generate_latest

from atop_server.batcher import BatcherConfig, DynamicBatcher
from atop_server.errors import DeadlineExceeded, NotReady, Overloaded
from atop_server.metrics import Metrics


class GatedModel:
    """Doubles its input once the gate opens; `entered` is set when the first execution starts."""

    def __init__(self):
        self.gate, self.entered, self.batches = threading.Event(), threading.Event(), []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait()
        self.batches.append(len(batch))
        return batch * 2


class SlowModel:
    """Doubles its input; takes `seconds` per execution; records every batch size."""

    def __init__(self, seconds: float = 0.0):
        self.seconds, self.batches = seconds, []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(len(batch))
        time.sleep(self.seconds)
        return batch * 2


def test_a_lone_request_runs_at_once_and_gets_its_rows():
    model = SlowModel()
    # A batcher that waited the delay for company would answer in 10 minutes, not within the 30 s allowed.
    batcher = DynamicBatcher(model, BatcherConfig(max_batch_size=8, max_queue_delay_us=600_000_000))
    result = batcher.submit([np.arange(3.0)])[0].result(timeout=30)
    assert result.tolist() == [0.0, 2.0, 4.0]
    batcher.close()


def test_requests_queued_while_the_model_runs_are_merged_and_split_back():
    model = GatedModel()
    batcher = DynamicBatcher(model, BatcherConfig(max_batch_size=64, max_queue_delay_us=2000))
    (blocker,) = batcher.submit([np.zeros(2)])
    model.entered.wait()  # the worker runs the blocker: the next sixteen requests queue together
    futures = [batcher.submit([np.full(2, float(i))], client=f"client{i}")[0] for i in range(16)]
    model.gate.set()
    assert [f.result(timeout=10).tolist() for f in futures] == [[2.0 * i, 2.0 * i] for i in range(16)]
    blocker.result(timeout=10)
    assert model.batches == [2, 32]  # one execution for all sixteen
    batcher.close()


def test_full_queue_refuses_at_once():
    model = GatedModel()
    batcher = DynamicBatcher(model, BatcherConfig(max_batch_size=4, max_queue_size=4))
    (first,) = batcher.submit([np.zeros(4)])
    model.entered.wait()  # the worker took it: the queue is empty again
    batcher.submit([np.zeros(4)], client="a")  # fills the queue
    with pytest.raises(Overloaded, match="queue full"):
        batcher.submit([np.zeros(1)], client="b")
    model.gate.set()
    first.result(timeout=5)
    batcher.close()


def test_a_request_refused_partway_through_its_parts_queues_none_of_them():
    model = GatedModel()
    batcher = DynamicBatcher(model, BatcherConfig(max_batch_size=4, max_queue_size=10))
    (blocker,) = batcher.submit([np.zeros(4)], client="a")
    model.entered.wait()
    (queued,) = batcher.submit([np.full(4, 1.0)], client="a")  # 4 of the 10 places taken
    with pytest.raises(Overloaded, match="queue full"):  # its first part would fit, its second not
        batcher.submit([np.full(4, 2.0), np.full(4, 3.0)], client="b")
    assert batcher.queued_images == 4
    model.gate.set()
    assert queued.result(timeout=5).tolist() == [2.0] * 4
    blocker.result(timeout=5)
    batcher.close()
    assert model.batches == [4, 4]  # nothing of the refused request ran


def test_expired_and_cancelled_requests_are_skipped():
    model = GatedModel()
    batcher = DynamicBatcher(model, BatcherConfig(max_batch_size=2))
    (busy,) = batcher.submit([np.zeros(2)])
    model.entered.wait()  # the worker runs `busy`: the next requests wait in the queue
    deadline = time.monotonic() + 0.01
    (expired,) = batcher.submit([np.zeros(2)], deadline=deadline)
    (cancelled,) = batcher.submit([np.zeros(2)])
    assert cancelled.cancel()
    (survivor,) = batcher.submit([np.ones(2)])
    time.sleep(max(deadline - time.monotonic(), 0) + 0.01)  # until the deadline has certainly passed, queued
    model.gate.set()
    assert survivor.result(timeout=5).tolist() == [2.0, 2.0]
    with pytest.raises(DeadlineExceeded):
        expired.result(timeout=5)
    busy.result(timeout=5)
    assert model.batches == [2, 2]  # the expired and the cancelled request never ran
    batcher.close()


def test_a_failing_model_fails_every_request_of_the_batch_and_the_batcher_goes_on():
    calls = []

    def flaky(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return batch

    gate = threading.Event()
    batcher = DynamicBatcher(lambda b: (gate.wait(), flaky(b))[1], BatcherConfig(max_batch_size=8))
    a, b = batcher.submit([np.zeros(1)])[0], batcher.submit([np.zeros(1)])[0]
    gate.set()
    errors = [f.exception(timeout=5) for f in (a, b)]
    assert any(isinstance(e, RuntimeError) for e in errors)
    assert batcher.submit([np.ones(1)])[0].result(timeout=5).tolist() == [1.0]
    batcher.close()


def test_a_model_returning_the_wrong_row_count_fails_the_batch_instead_of_mixing_answers():
    gate = threading.Event()
    batcher = DynamicBatcher(lambda b: (gate.wait(), b[:-1])[1], BatcherConfig(max_batch_size=8))
    futures = [batcher.submit([np.full(2, float(i))])[0] for i in range(3)]
    gate.set()
    for future in futures:
        with pytest.raises(RuntimeError, match="output rows for a batch of"):
            future.result(timeout=5)
    batcher.close()


def test_the_queue_gauge_reads_the_batcher():
    model, metrics = GatedModel(), Metrics()
    batcher = DynamicBatcher(model, BatcherConfig(max_batch_size=2))
    metrics.watch_queue("m", batcher)
    running = batcher.submit([np.zeros(2)])[0]
    assert model.entered.wait(5)  # the first request runs (held at the gate); the next ones wait in the queue
    waiting = batcher.submit([np.zeros(2), np.zeros(1)])
    assert 'atop_queue_images{model="m"} 3.0' in generate_latest(metrics.registry).decode()
    model.gate.set()
    for future in (running, *waiting):
        future.result(timeout=5)
    assert 'atop_queue_images{model="m"} 0.0' in generate_latest(metrics.registry).decode()
    batcher.close()


def test_close_finishes_queued_work_then_refuses():
    model = SlowModel(seconds=0.05)
    batcher = DynamicBatcher(model, BatcherConfig(max_batch_size=1))
    futures = [batcher.submit([np.full(1, float(i))])[0] for i in range(5)]
    batcher.close()
    assert [f.result(timeout=0).tolist() for f in futures] == [[2.0 * i] for i in range(5)]
    with pytest.raises(NotReady):
        batcher.submit([np.zeros(1)])


def test_clients_take_turns_so_a_big_request_does_not_hold_back_a_small_one():
    model = GatedModel()
    batcher = DynamicBatcher(model, BatcherConfig(max_batch_size=4, max_queue_size=64))
    (blocker,) = batcher.submit([np.zeros(4)], client="big")
    model.entered.wait()  # the worker runs it and waits at the gate
    big = batcher.submit([np.full(4, 1.0) for _ in range(8)], client="big")  # 32 images in 8 parts
    (small,) = batcher.submit([np.full(1, 7.0)], client="small")
    model.gate.set()
    assert small.result(timeout=5).tolist() == [14.0]
    assert [f.result(timeout=5).tolist() for f in big] == [[2.0] * 4] * 8
    blocker.result(timeout=5)
    # The small request ran after one part of the big one (FIFO: after all eight).
    assert model.batches == [4, 4, 1, 4, 4, 4, 4, 4, 4, 4]
    batcher.close()


def test_one_connection_cannot_take_the_whole_queue():
    model = GatedModel()
    batcher = DynamicBatcher(model, BatcherConfig(max_batch_size=4, max_queue_size=16, max_client_queue_size=8))
    batcher.submit([np.zeros(4)], client="greedy")
    model.entered.wait()
    batcher.submit([np.zeros(4), np.zeros(4)], client="greedy")
    with pytest.raises(Overloaded, match="this connection already has 8 images waiting"):
        batcher.submit([np.zeros(1)], client="greedy")
    assert batcher.submit([np.zeros(4)], client="other")  # others still have room
    with pytest.raises(ValueError, match="can never be queued"):
        batcher.submit([np.zeros(4)] * 3, client="new")  # 12 > the 8 one connection may hold
    model.gate.set()
    batcher.close()


def test_expected_wait_beyond_the_limit_or_the_deadline_is_refused_at_once():
    model = GatedModel()
    config = BatcherConfig(max_batch_size=4, max_queue_size=64, max_queue_wait_seconds=2.0)
    batcher = DynamicBatcher(model, config)
    batcher.calibrate(seconds=0.4, images=4)  # 0.1 s per image
    batcher.submit([np.zeros(4)], client="a")
    model.entered.wait()  # running
    batcher.submit([np.zeros(4)] * 3, client="b")  # 16 images ahead now: 1.6 s
    with pytest.raises(Overloaded, match=r"expected wait 2.10 s \(16 images ahead\) exceeds 2.00 s"):
        batcher.submit([np.zeros(4), np.zeros(1)], client="c")
    with pytest.raises(Overloaded, match=r"expected wait 1\.70 s"):  # within the limit, not the deadline
        batcher.submit([np.zeros(1)], deadline=time.monotonic() + 1.0, client="c")
    with pytest.raises(DeadlineExceeded, match=r"3 images need about 0\.30 s"):  # not even alone
        batcher.submit([np.zeros(3)], deadline=time.monotonic() + 0.2, client="c")
    assert batcher.submit([np.zeros(4)], client="c")  # 2.0 s: within the limit
    model.gate.set()
    batcher.close()
