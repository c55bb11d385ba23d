"""The serving core: models, decoding, batching, statistics. Never imports grpc (the servicers do).

Per request: decode and validate (a thread pool, off the asyncio loop that serves gRPC; Pillow releases the
GIL while it decodes) -> convert to the model's input layout -> the dynamic batcher -> the model graph
(RT + purifier + classifier, all inside onnxruntime, which releases the GIL). RT is drawn inside the graph
on every execution, from a session seeded by OS entropy (session.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from atop_server.batcher import BatcherConfig, DynamicBatcher, Execution
from atop_server.codec import decode_image, image_pixels
from atop_server.errors import (
    DeadlineExceeded,
    InvalidInput,
    NotReady,
    Overloaded,
)
from atop_server.outputs import IMAGE_OUTPUTS, Answer, answer, row_type
from atop_server.repository import LoadedModel, ModelLoadError, ModelNotFoundError, list_models, load_model

log = logging.getLogger("atop_server")


@dataclass(frozen=True)
class CoreConfig:
    model_repository: Path
    models: tuple[str, ...] = ()  # which models to serve; empty: every model in the repository
    default_model: str = ""  # for the own API when a request names none; empty: the first served model
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 0  # onnxruntime threads per session; 0: one per core
    decode_workers: int = 4  # threads decoding images
    max_draws: int = 16  # bound on the `draws` parameter (each draw costs a full model pass)
    max_images_per_request: int = 1024
    # Decoding cost is bounded in pixels (what a small compressed file can expand to): per request, and over
    # all requests being decoded at once (about 3 bytes of memory per pixel, more while converting modes).
    max_request_pixels: int = 64_000_000
    max_pixels_in_flight: int = 128_000_000
    batcher: BatcherConfig = field(default_factory=BatcherConfig)


@dataclass(frozen=True)
class Call:
    """Who asks and until when: the fairness key (one client connection) and the deadline (monotonic)."""

    client: str = ""
    deadline: float | None = None

    def time_left(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def within(self, seconds: float) -> Call:
        """This call with its deadline brought forward to `seconds` from now, if that is sooner."""
        deadline = time.monotonic() + seconds
        return replace(self, deadline=deadline if self.deadline is None else min(self.deadline, deadline))

    def check_deadline(self, during: str) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceeded(f"the request's deadline passed {during}")


class PixelBudget:
    """Decoded pixels in flight over all requests: a request that would exceed it is refused at once."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._lock:
            if self.used + pixels > self.limit:
                raise Overloaded(
                    f"{self.used} pixels are being decoded, this request adds {pixels} (limit {self.limit}): "
                    "retry with backoff"
                )
            self.used += pixels
        try:
            yield
        finally:
            with self._lock:
                self.used -= pixels


@dataclass
class Duration:
    count: int = 0
    seconds: float = 0.0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.seconds += seconds


@dataclass
class ModelStats:
    """Triton-style cumulative statistics (ModelStatistics RPC); updated under the model's lock."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batch_compute: dict[int, Duration] = field(default_factory=dict)


class ServedModel:
    def __init__(
        self, loaded: LoadedModel, batcher_config: BatcherConfig, on_execution: Callable[[str, Execution], None]
    ) -> None:
        self.loaded = loaded
        self.stats = ModelStats()
        self.lock = threading.Lock()
        spec = loaded.input_spec
        self.layout, self.size = spec["layout"], int(spec["height"])
        self.input_name = loaded.inputs[0].name
        self.output_name = loaded.outputs[0].name
        self.num_classes = len(loaded.labels)
        self.image_outputs = tuple(o.name for o in loaded.outputs if o.name in IMAGE_OUTPUTS)
        self._rows = row_type(self.output_name, self.num_classes, self.image_outputs, self.size)
        self.image_requests = 0  # requests in flight that asked for images (outputs.py); on the event loop

        def record(execution: Execution) -> None:
            with self.lock:
                self.stats.execution_count += 1
                self.stats.queue.add(sum(execution.queue_seconds), len(execution.queue_seconds))
                self.stats.compute.add(execution.compute_seconds)
                self.stats.batch_compute.setdefault(execution.batch_size, Duration()).add(execution.compute_seconds)
            on_execution(loaded.name, execution)

        self.batcher = DynamicBatcher(self._run, batcher_config, record, name=f"batcher-{loaded.name}")

    @property
    def name(self) -> str:
        return self.loaded.name

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if not self.image_requests:
            return self.loaded.session.run([self.output_name], {self.input_name: batch})[0]
        names = [self.output_name, *self.image_outputs]
        rows = np.empty(len(batch), self._rows)
        for name, values in zip(names, self.loaded.session.run(names, {self.input_name: batch}), strict=True):
            rows[name] = values
        return rows

    def to_model_input(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,H,W,3] (decoded) or float32 [N,3,H,W] in [0,1] -> the graph's own input layout."""
        if images.dtype == np.uint8:
            if self.layout == "NHWC":
                return images
            return images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        if self.layout == "NHWC":
            raise InvalidInput(
                f"model {self.name} takes UINT8 [N,{self.size},{self.size},3] images; FP32 would lose precision "
                "if quantized: send FP32 to a model with an NCHW float input"
            )
        return images


class InferenceCore:
    def __init__(self, config: CoreConfig, on_execution: Callable[[str, Execution], None] = lambda m, e: None) -> None:
        self.config = config
        self.on_execution = on_execution
        self.models: dict[str, ServedModel] = {}
        self.versions: dict[str, list[int]] = {}
        self._decoder = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="decode")
        self._pixels_in_flight = PixelBudget(config.max_pixels_in_flight)
        self.decoded_images = 0  # images decoded since start (a metric; shows that cancelled work stops)
        self.ready = False
        self.closing = False

    # -- lifecycle ---------------------------------------------------------------------------------------
    def load(self) -> None:
        available = list_models(self.config.model_repository)
        names = list(self.config.models) or list(available)
        if not names:
            raise ModelNotFoundError(f"no models in {self.config.model_repository}")
        for name in names:
            if name not in available:
                raise ModelNotFoundError(f"model {name!r} is not in {self.config.model_repository}")
            loaded = load_model(
                self.config.model_repository,
                name,
                None,
                self.config.providers,
                intra_op_threads=self.config.intra_op_threads,
            )
            if loaded.metadata.get("atop.export", {}).get("role") == "purifier":
                # The purifier piece maps (RT image, mask) to an image: a debugging aid, not a classifier.
                if self.config.models:
                    raise ModelLoadError(f"model {name!r} is a purifier piece (images out, no classes): not servable")
                log.info(json.dumps({"event": "skipped", "model": name, "reason": "purifier piece"}))
                continue
            self.models[name] = ServedModel(loaded, self.config.batcher, self.on_execution)
            self.versions[name] = available[name]

    def warmup(self) -> None:
        """Executions of a single image and of a full batch per model, so the first client does not pay graph
        setup and admission control knows from the start how fast a full queue drains."""
        for model in self.models.values():
            for batch in (1, self.config.batcher.max_batch_size, self.config.batcher.max_batch_size):
                if model.layout == "NHWC":
                    dummy = np.zeros((batch, model.size, model.size, 3), np.uint8)
                else:
                    dummy = np.zeros((batch, 3, model.size, model.size), np.float32)
                started = time.monotonic()
                model._run(dummy)
            model.batcher.calibrate(time.monotonic() - started, batch)  # the second full batch: warmed up

    def start(self) -> None:
        self.load()
        self.warmup()
        self.ready = True

    def close(self) -> None:
        """Refuse new work, finish what is queued, stop the workers."""
        self.closing, self.ready = True, False
        for model in self.models.values():
            model.batcher.close()
        self._decoder.shutdown(wait=True, cancel_futures=True)

    # -- lookups ------------------------------------------------------------------------------------------
    def model(self, name: str, version: str = "") -> ServedModel:
        if not name:
            name = self.config.default_model or next(iter(self.models))
        if name not in self.models:
            raise ModelNotFoundError(f"unknown model {name!r}; served: {', '.join(self.models)}")
        served = self.models[name]
        if version and version != str(served.loaded.version):
            raise ModelNotFoundError(f"model {name!r} has no version {version!r} (serving {served.loaded.version})")
        return served

    # -- inference ----------------------------------------------------------------------------------------
    async def decode(self, encoded: list[bytes], size: int, call: Call) -> np.ndarray:
        """Encoded images -> uint8 [N,size,size,3]. What decoding will cost is read from the headers first and
        bounded per request and in flight; the deadline is checked between images, and a cancelled request
        (its task cancelled) decodes no further image. A request keeps at most decode_workers images in the
        pool at a time, so a big request does not queue a small one's decoding behind all of its own."""
        self._check_count(len(encoded))
        if len(encoded) == 1:
            # One image, the common request at low load: header check, pixel budget and decoding in a single
            # trip to the pool instead of two. Each trip wakes a thread, which on a busy machine waits for a
            # core: at concurrency 1 the p99 fell from 28-30 to 19-20 ms (docs/performance.md).
            call.check_deadline("before its image was decoded")
            image = await asyncio.wrap_future(self._decoder.submit(self._decode_one, encoded[0], size))
            self.decoded_images += 1
            return image[None]
        pixels = await asyncio.wrap_future(self._decoder.submit(self._request_pixels, encoded))
        with self._pixels_in_flight.hold(pixels):
            decoded: list[np.ndarray | None] = [None] * len(encoded)
            indices = iter(range(len(encoded)))

            async def lane() -> None:
                for i in indices:
                    call.check_deadline("while its images were decoded")
                    future = self._decoder.submit(decode_image, encoded[i], size, i)
                    decoded[i] = await asyncio.wrap_future(future)
                    self.decoded_images += 1  # on the event loop: no lock needed

            lanes = [asyncio.ensure_future(lane()) for _ in range(min(self.config.decode_workers, len(encoded)))]
            try:
                await asyncio.gather(*lanes)
            finally:
                for task in lanes:  # the first failure stops the other lanes too
                    task.cancel()
        return np.stack(decoded)  # type: ignore[arg-type]

    def _decode_one(self, data: bytes, size: int) -> np.ndarray:
        """A one-image request, on a pool thread: bounded like any request, then decoded."""
        with self._pixels_in_flight.hold(self._request_pixels([data])):
            return decode_image(data, size, 0)

    def _request_pixels(self, encoded: list[bytes]) -> int:
        """Decoded pixels of a whole request, from the headers; the first bad image fails the request."""
        total = sum(image_pixels(data, i) for i, data in enumerate(encoded))
        if total > self.config.max_request_pixels:
            raise InvalidInput(
                f"the request's {len(encoded)} images hold {total} pixels, above the limit of "
                f"{self.config.max_request_pixels} per request: send fewer or smaller images per request"
            )
        return total

    def _check_count(self, count: int) -> None:
        if count == 0:
            raise InvalidInput("the request holds no images")
        if count > self.config.max_images_per_request:
            raise InvalidInput(f"{count} images exceed the limit of {self.config.max_images_per_request} per request")

    def validate_pixels(self, model: ServedModel, images: np.ndarray) -> np.ndarray:
        """Check an already decoded batch: uint8 [N,H,W,3] or float32 [N,3,H,W] in [0,1], the model's size."""
        self._check_count(len(images))
        s = model.size
        if images.dtype == np.uint8:
            if images.shape[1:] != (s, s, 3):
                raise InvalidInput(f"UINT8 images must be [N,{s},{s},3] (HWC, RGB), got {list(images.shape)}")
            return images
        if images.dtype != np.float32:
            raise InvalidInput(f"images must be UINT8 [N,H,W,3] or FP32 [N,3,H,W], got {images.dtype}")
        if images.shape[1:] != (3, s, s):
            raise InvalidInput(f"FP32 images must be [N,3,{s},{s}] (CHW, RGB), got {list(images.shape)}")
        if not np.isfinite(images).all():
            raise InvalidInput("FP32 images contain NaN or infinite values")
        if images.min() < 0.0 or images.max() > 1.0:
            raise InvalidInput(f"FP32 pixel values must lie in [0, 1], got [{images.min():.4g}, {images.max():.4g}]")
        return images

    def check_draws(self, count: int, draws: int) -> None:
        """Refuse up front what can never be served: retrying would not help, so it is the client's to fix."""
        if not 1 <= draws <= self.config.max_draws:
            raise InvalidInput(f"draws must be between 1 and {self.config.max_draws}, got {draws}")
        limit = self.config.batcher.client_limit
        if count * draws > limit:
            raise InvalidInput(
                f"{count} images x {draws} draws = {count * draws} model inputs exceed the {limit} one "
                "connection may have queued: send fewer images or draws per request"
            )

    async def classify(self, model: ServedModel, images: np.ndarray, draws: int, call: Call) -> np.ndarray:
        """Probabilities [N, classes], averaged over `draws` independent RT draws."""
        return (await self.infer(model, images, draws, call)).probabilities

    async def infer(
        self, model: ServedModel, images: np.ndarray, draws: int, call: Call, image_outputs: tuple[str, ...] = ()
    ) -> Answer:
        """The probabilities averaged over `draws` RT draws, their stability, and the image outputs asked for
        (the first draw's)."""
        if not image_outputs:
            results = await self._draws(model, images, draws, call)
        else:
            model.image_requests += 1  # before submitting: every run of its parts fetches the images
            try:
                results = await self._draws(model, images, draws, call)
            finally:
                model.image_requests -= 1
        # A part that shared its execution with a request for images came back as structured rows.
        plain = not image_outputs
        rows = np.concatenate([r[model.output_name] if plain and r.dtype.names else r for r in results])
        return answer(rows, model.output_name, draws, image_outputs)

    async def _draws(self, model: ServedModel, images: np.ndarray, draws: int, call: Call) -> list[np.ndarray]:
        """The outputs of `draws` independent RT draws of the images, part by part. Admitted whole or refused at
        once; cancelling the awaiting task, or the deadline, withdraws the request's queued work."""
        if self.closing or not self.ready:
            raise NotReady("the server is not ready (starting up or shutting down)")
        self.check_draws(len(images), draws)
        started = time.monotonic()
        batch = model.to_model_input(images)
        step = self.config.batcher.max_batch_size
        # Each draw is another copy of the request's images (views, not copies): each gets its own RT draw.
        parts = [batch[i : i + step] for _ in range(draws) for i in range(0, len(batch), step)]
        futures = model.batcher.submit(parts, call.deadline, call.client)
        try:
            done = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
            results = await asyncio.wait_for(done, call.time_left())
        except TimeoutError:
            raise DeadlineExceeded("no answer within the request's deadline") from None
        finally:
            for f in futures:
                f.cancel()  # after a timeout, a cancellation or a failed part, nothing else of the request runs
        # A failure is counted by the servicer's failures_counted (once per request, whatever failed).
        self._record(model, time.monotonic() - started, True, len(images))
        return list(results)

    @contextlib.contextmanager
    def failures_counted(self, model: ServedModel) -> Iterator[None]:
        """Counts a request that fails inside as a failure of `model` (ModelStatistics' fail, as Triton does),
        whatever went wrong: bad input, parameters, overload, deadline, cancellation."""
        started = time.monotonic()
        try:
            yield
        except BaseException:
            self._record(model, time.monotonic() - started, False, 0)
            raise

    def _record(self, model: ServedModel, seconds: float, ok: bool, images: int) -> None:
        with model.lock:
            (model.stats.success if ok else model.stats.fail).add(seconds)
            if ok:
                model.stats.inference_count += images
                model.stats.last_inference_ms = int(time.time() * 1000)
