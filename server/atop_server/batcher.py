"""Dynamic batching across concurrent requests: concatenate, run once, split back (PyTriton's pattern).

A lone request runs at once: the batcher never waits for company when nothing else is queued. Under load,
requests queue while the model runs and the next execution takes all it can (up to max_batch_size), so
batches grow with concurrency by themselves; max_queue_delay_us only lets a batch that already has company
wait briefly for more. Requests whose deadline passed or that were cancelled are skipped before they run.

Admission is decided at once, never by waiting: a request is refused (Overloaded) when the queue is full in
images, when its client already holds its share of the queue, or when the expected wait (images ahead times
the measured seconds per image) exceeds max_queue_wait_seconds or the request's own deadline. Clients take
turns: each execution takes one part from each client in round-robin order, so one client's 1024-image
request does not hold back another client's single image behind all of it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from atop_server.errors import DeadlineExceeded, NotReady, Overloaded

# Weight of the newest execution in the seconds-per-image estimate (an exponential moving average).
_ESTIMATE_WEIGHT = 0.2


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 64  # images per model execution
    max_queue_delay_us: int = 500  # extra wait for more requests, only when the batch already has company
    max_queue_size: int = 2048  # images waiting, all clients together; beyond it requests are refused
    max_client_queue_size: int = 1024  # images one client (connection) may have waiting; capped by the above
    max_queue_wait_seconds: float = 10.0  # refuse at once what would wait longer than this in the queue

    @property
    def client_limit(self) -> int:
        """The most images one request may ever queue: a larger request can never be served."""
        return min(self.max_client_queue_size, self.max_queue_size)


@dataclass
class _Item:
    images: np.ndarray
    future: Future
    deadline: float | None  # time.monotonic() seconds
    enqueued: float
    client: str


@dataclass(frozen=True)
class Execution:
    """What one model execution did, for statistics and metrics."""

    batch_size: int
    queue_seconds: list[float]  # one per request in the batch
    compute_seconds: float
    failed: bool


class DynamicBatcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        config: BatcherConfig,
        on_execution: Callable[[Execution], None] = lambda execution: None,
        name: str = "batcher",
    ) -> None:
        self.run, self.config, self.on_execution = run, config, on_execution
        self._queues: dict[str, deque[_Item]] = {}  # per client, in round-robin order (dicts keep insertion order)
        self._client_images: dict[str, int] = {}
        self._queued_images = 0
        self._running_images = 0
        self._seconds_per_image: float | None = None  # measured; None until the first full-enough execution
        self._changed = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def calibrate(self, seconds: float, images: int) -> None:
        """Feed the seconds-per-image estimate (warmup does, before the first request)."""
        with self._changed:
            per_image = seconds / images
            previous = self._seconds_per_image
            self._seconds_per_image = (
                per_image if previous is None else previous + _ESTIMATE_WEIGHT * (per_image - previous)
            )

    def submit(self, parts: Sequence[np.ndarray], deadline: float | None = None, client: str = "") -> list[Future]:
        """Queue one request's parts (each at most max_batch_size images), all of them or none; each future
        gets its part's output rows. Raises Overloaded or DeadlineExceeded at once when it cannot be served."""
        if any(len(part) > self.config.max_batch_size for part in parts):
            raise ValueError(f"a part exceeds max_batch_size {self.config.max_batch_size}: split first")
        count = sum(len(part) for part in parts)
        if count > self.config.client_limit:
            raise ValueError(f"{count} images can never be queued (limit {self.config.client_limit}): refuse earlier")
        now = time.monotonic()
        with self._changed:
            if self._closed:
                raise NotReady("the server is shutting down")
            self._admit(count, client, None if deadline is None else deadline - now)
            items = [_Item(part, Future(), deadline, now, client) for part in parts]
            self._queues.setdefault(client, deque()).extend(items)
            self._client_images[client] = self._client_images.get(client, 0) + count
            self._queued_images += count
            self._changed.notify()
        return [item.future for item in items]

    def _admit(self, count: int, client: str, time_left: float | None) -> None:
        """Refuse what cannot be served in time; called with the lock held."""
        if self._queued_images + count > self.config.max_queue_size:
            raise Overloaded(
                f"queue full ({self._queued_images} images waiting, limit {self.config.max_queue_size}): "
                "retry with backoff"
            )
        held = self._client_images.get(client, 0)
        if held + count > self.config.max_client_queue_size:
            raise Overloaded(
                f"this connection already has {held} images waiting (limit {self.config.max_client_queue_size} "
                "per connection): wait for answers before sending more"
            )
        if self._seconds_per_image is None:
            return
        own = count * self._seconds_per_image
        if time_left is not None and own > time_left:
            raise DeadlineExceeded(f"{count} images need about {own:.2f} s, more than the {time_left:.2f} s left")
        ahead = self._queued_images + self._running_images
        expected = (ahead + count) * self._seconds_per_image
        limit = (
            self.config.max_queue_wait_seconds
            if time_left is None
            else min(time_left, self.config.max_queue_wait_seconds)
        )
        if ahead and expected > limit:
            raise Overloaded(
                f"expected wait {expected:.2f} s ({ahead} images ahead) exceeds {limit:.2f} s: retry with backoff"
            )

    def close(self) -> None:
        """Stop taking requests; what is queued still runs; returns when the worker has finished it."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._worker.join()

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not self._queues and not self._closed:
                    self._changed.wait()
                if not self._queues:
                    return  # closed and drained
                batch = self._collect()
                self._running_images = sum(len(item.images) for item in batch)
            if batch:
                self._execute(batch)
            with self._changed:
                self._running_images = 0

    def _take(self, room: int) -> _Item | None:
        """The next client's head part if it fits in `room` images; that client moves to the back."""
        client = next(iter(self._queues))
        queue = self._queues[client]
        if len(queue[0].images) > room:
            return None
        item = queue.popleft()
        del self._queues[client]
        if queue:
            self._queues[client] = queue
        self._queued_images -= len(item.images)
        self._client_images[client] -= len(item.images)
        if not self._client_images[client]:
            del self._client_images[client]
        return item

    def _collect(self) -> list[_Item]:
        """Take queued parts, clients in turn, while they fit; wait up to the delay for more only if there
        was company."""
        company = sum(len(queue) for queue in self._queues.values()) > 1
        wait_until = time.monotonic() + self.config.max_queue_delay_us / 1e6
        batch: list[_Item] = []
        size = 0
        while True:
            while self._queues and (item := self._take(self.config.max_batch_size - size)) is not None:
                if self._runnable(item):
                    batch.append(item)
                    size += len(item.images)
            remaining = wait_until - time.monotonic()
            full = size >= self.config.max_batch_size or bool(self._queues)  # the next one does not fit
            if full or not company or self._closed or remaining <= 0:
                return batch
            self._changed.wait(remaining)

    @staticmethod
    def _runnable(item: _Item) -> bool:
        """False for a cancelled request, or one whose deadline passed while queued (answered here)."""
        if not item.future.set_running_or_notify_cancel():
            return False
        if item.deadline is not None and time.monotonic() > item.deadline:
            item.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
            return False
        return True

    def _execute(self, batch: list[_Item]) -> None:
        started = time.monotonic()
        queue_seconds = [started - item.enqueued for item in batch]
        size = sum(len(item.images) for item in batch)
        outputs: np.ndarray | None = None
        failure: Exception | None = None
        try:
            outputs = self.run(np.concatenate([item.images for item in batch]))
        except Exception as error:  # noqa: BLE001 - any failure of the model must reach every waiting caller
            failure = error
        else:
            if len(outputs) != size:  # split by position, a wrong row count would hand callers others' rows
                failure = RuntimeError(f"the model returned {len(outputs)} output rows for a batch of {size} images")
        compute = time.monotonic() - started
        # Small batches cost more per image than the full ones that a loaded queue runs: only batches at least
        # half full say how fast a queue drains.
        if failure is None and size >= math.ceil(self.config.max_batch_size / 2):
            self.calibrate(compute, size)
        # Statistics before answers: a client that got its answer sees its execution counted.
        self.on_execution(Execution(size, queue_seconds, compute, failure is not None))
        offset = 0
        for item in batch:
            if failure is not None:
                item.future.set_exception(failure)
            else:
                item.future.set_result(outputs[offset : offset + len(item.images)])  # type: ignore[index]
                offset += len(item.images)
