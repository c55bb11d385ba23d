"""Dynamic batching across concurrent requests: concatenate, run once, split back (PyTriton's pattern).

A lone request runs at once: the batcher never waits for company when nothing else is queued. Under load,
requests queue while the model runs and the next execution takes all of them (up to max_batch_size), so
batches grow with concurrency by themselves; max_queue_delay_us only lets a batch that already has company
wait briefly for more. The queue is bounded in images: a full queue refuses at once (Overloaded), never
drops silently. Requests whose deadline passed or that were cancelled are skipped before they run.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from atop_server.errors import DeadlineExceeded, NotReady, Overloaded


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 64  # images per model execution
    max_queue_delay_us: int = 500  # extra wait for more requests, only when the batch already has company
    max_queue_size: int = 1024  # images waiting; beyond it requests are refused (RESOURCE_EXHAUSTED)


@dataclass
class _Item:
    images: np.ndarray
    future: Future
    deadline: float | None  # time.monotonic() seconds
    enqueued: float


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
        self._pending: deque[_Item] = deque()
        self._queued_images = 0
        self._changed = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name=name, daemon=True)
        self._worker.start()

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def submit(self, images: np.ndarray, deadline: float | None = None) -> Future:
        """Queue a request of at most max_batch_size images; its future gets the model's output rows."""
        if len(images) > self.config.max_batch_size:
            raise ValueError(f"{len(images)} images exceed max_batch_size {self.config.max_batch_size}: split first")
        future: Future = Future()
        with self._changed:
            if self._closed:
                raise NotReady("the server is shutting down")
            if self._queued_images + len(images) > self.config.max_queue_size:
                raise Overloaded(
                    f"queue full ({self._queued_images} images waiting, limit {self.config.max_queue_size}): "
                    "retry with backoff"
                )
            self._queued_images += len(images)
            self._pending.append(_Item(images, future, deadline, time.monotonic()))
            self._changed.notify()
        return future

    def close(self) -> None:
        """Stop taking requests; what is queued still runs; returns when the worker has finished it."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._worker.join()

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if not self._pending:
                    return  # closed and drained
                batch = self._collect()
            if batch:
                self._execute(batch)

    def _collect(self) -> list[_Item]:
        """Take queued requests while they fit; wait up to the delay for more only if there was company."""
        company = len(self._pending) > 1
        wait_until = time.monotonic() + self.config.max_queue_delay_us / 1e6
        batch: list[_Item] = []
        size = 0
        while True:
            while self._pending and size + len(self._pending[0].images) <= self.config.max_batch_size:
                item = self._pending.popleft()
                self._queued_images -= len(item.images)
                if self._runnable(item):
                    batch.append(item)
                    size += len(item.images)
            remaining = wait_until - time.monotonic()
            full = size >= self.config.max_batch_size or bool(self._pending)  # the next one does not fit
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
        try:
            outputs = self.run(np.concatenate([item.images for item in batch]))
        except Exception as error:  # noqa: BLE001 - any failure of the model must reach every waiting caller
            for item in batch:
                item.future.set_exception(error)
            failed = True
        else:
            offset = 0
            for item in batch:
                item.future.set_result(outputs[offset : offset + len(item.images)])
                offset += len(item.images)
            failed = False
        compute = time.monotonic() - started
        self.on_execution(Execution(sum(len(i.images) for i in batch), queue_seconds, compute, failed))
