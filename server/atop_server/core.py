"""The serving core: models, decoding, batching, statistics. Never imports grpc (the servicers do).

Per request: decode and validate (a thread pool, off the gRPC threads' critical path; Pillow releases the
GIL while it decodes) -> convert to the model's input layout -> the dynamic batcher -> the model graph
(RT + purifier + classifier, all inside onnxruntime, which releases the GIL). RT is drawn inside the graph
on every execution, from a session seeded by OS entropy (session.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atop_server.batcher import BatcherConfig, DynamicBatcher, Execution
from atop_server.codec import decode_image
from atop_server.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    ModelLoadError,
    ModelNotFoundError,
    NotReady,
)
from atop_server.repository import LoadedModel, list_models, load_model

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
    batcher: BatcherConfig = field(default_factory=BatcherConfig)


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
        return self.loaded.session.run([self.output_name], {self.input_name: batch})[0]

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
        """One execution per model and batch shape class, so the first client does not pay graph setup."""
        for model in self.models.values():
            for batch in (1, min(8, self.config.batcher.max_batch_size)):
                if model.layout == "NHWC":
                    dummy = np.zeros((batch, model.size, model.size, 3), np.uint8)
                else:
                    dummy = np.zeros((batch, 3, model.size, model.size), np.float32)
                model._run(dummy)

    def start(self) -> None:
        self.load()
        self.warmup()
        self.ready = True

    def close(self) -> None:
        """Refuse new work, finish what is queued, stop the workers."""
        self.closing, self.ready = True, False
        for model in self.models.values():
            model.batcher.close()
        self._decoder.shutdown(wait=True)

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
    def decode(self, encoded: list[bytes], size: int) -> np.ndarray:
        """Encoded images -> uint8 [N,size,size,3], in parallel; the first bad image fails the request."""
        self._check_count(len(encoded))
        futures = [self._decoder.submit(decode_image, data, size, i) for i, data in enumerate(encoded)]
        return np.stack([f.result() for f in futures])

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

    def classify(
        self,
        model: ServedModel,
        images: np.ndarray,
        draws: int = 1,
        timeout: float | None = None,
        cancelled: Future | None = None,
    ) -> np.ndarray:
        """Probabilities [N, classes], averaged over `draws` independent RT draws. `cancelled` (done when the
        client went away) and the timeout withdraw the request's queued work."""
        if self.closing or not self.ready:
            raise NotReady("the server is not ready (starting up or shutting down)")
        if not 1 <= draws <= self.config.max_draws:
            raise InvalidInput(f"draws must be between 1 and {self.config.max_draws}, got {draws}")
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        batch = model.to_model_input(images)
        repeated = np.concatenate([batch] * draws) if draws > 1 else batch  # each copy gets its own RT draw
        step = self.config.batcher.max_batch_size
        futures = [model.batcher.submit(repeated[i : i + step], deadline) for i in range(0, len(repeated), step)]
        try:
            self._wait(futures, deadline, cancelled)
            rows = np.concatenate([f.result() for f in futures])
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        self._record(model, len(images), time.monotonic() - started, ok=True)
        return rows.reshape(draws, len(images), -1).mean(0)

    @contextlib.contextmanager
    def failures_counted(self, model: ServedModel) -> Iterator[None]:
        """Counts a request that fails inside as a failure of `model` (ModelStatistics' fail, as Triton does),
        whatever went wrong: bad input, parameters, overload, deadline, cancellation."""
        started = time.monotonic()
        try:
            yield
        except BaseException:
            self._record(model, 0, time.monotonic() - started, ok=False)
            raise

    @staticmethod
    def _wait(futures: list[Future], deadline: float | None, cancelled: Future | None) -> None:
        pending: set[Future] = set(futures)
        while pending:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("no answer within the request's deadline")
            done, _ = wait(pending | ({cancelled} if cancelled else set()), remaining, FIRST_COMPLETED)
            if cancelled is not None and cancelled in done:
                raise Cancelled("the client cancelled the request")
            pending -= done

    def _record(self, model: ServedModel, images: int, seconds: float, ok: bool) -> None:
        with model.lock:
            (model.stats.success if ok else model.stats.fail).add(seconds)
            if ok:
                model.stats.inference_count += images
                model.stats.last_inference_ms = int(time.time() * 1000)
