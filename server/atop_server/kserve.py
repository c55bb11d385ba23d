"""The KServe v2 / Open Inference Protocol gRPC service (inference.GRPCInferenceService), Triton flavour.

Each RPC: validate -> decode -> core -> encode. Inputs of ModelInfer: encoded images as BYTES [N,1] or [N],
decoded UINT8 [N,H,W,3], or FP32 [N,3,H,W] in [0,1], as raw_input_contents or typed contents. Outputs:
PROBABILITIES FP32 [N,classes]; with the classification extension (output parameter class_count = k) a
BYTES [N,k] tensor of "score:index:label" strings, best first. On request (by name; outputs.py): RT_IMAGE and
PURIFIED FP32 [N,3,H,W] of the first draw where the graph has them, and STABILITY FP32 [N].
Request parameters: draws (RT draws averaged per image) and timeout (Triton's, in microseconds).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import grpc
import numpy as np

from atop_proto import grpc_service_pb2 as pb
from atop_proto import grpc_service_pb2_grpc as pb_grpc
from atop_proto.tensors import join_bytes_tensor
from atop_server import __version__
from atop_server.codec import array_from_raw, split_bytes_tensor
from atop_server.core import Call, InferenceCore, ServedModel
from atop_server.errors import InvalidInput
from atop_server.metrics import Metrics
from atop_server.outputs import STABILITY, Answer
from atop_server.servicing import answer_each, call_of, request_id

EXTENSIONS = ["classification", "model_configuration", "statistics"]
PLATFORM = "onnxruntime_onnx"
_ORT_TO_KSERVE = {"tensor(float)": "FP32", "tensor(uint8)": "UINT8", "tensor(float16)": "FP16"}
_KSERVE_TO_CONFIG = {"FP32": pb.TYPE_FP32, "UINT8": pb.TYPE_UINT8, "FP16": pb.TYPE_FP16, "BYTES": pb.TYPE_STRING}
_TYPED = {"UINT8": "uint_contents", "FP32": "fp32_contents", "BYTES": "bytes_contents"}


def _shape(spec_shape: tuple) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in spec_shape]


def accepted_inputs(model: ServedModel) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of every input a request may supply, one per request: the graph's own first,
    then encoded images (BYTES) and, for a float graph, decoded UINT8 pixels. Advertised as separate names so
    that a Triton or KServe client finds the BYTES input in ModelMetadata alone; the server goes by the
    datatype, so each name takes any of the three."""
    own = model.loaded.inputs[0]
    inputs = [(own.name, _ORT_TO_KSERVE[own.datatype], _shape(own.shape))]
    inputs.append((f"{own.name}_BYTES", "BYTES", [-1, 1]))
    if model.layout == "NCHW":
        inputs.append((f"{own.name}_UINT8", "UINT8", [-1, model.size, model.size, 3]))
    return inputs


def served_outputs(model: ServedModel) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of every output a request may ask for: the graph's, then the stability."""
    graph = [(s.name, _ORT_TO_KSERVE[s.datatype], _shape(s.shape)) for s in model.loaded.outputs]
    return [*graph, (STABILITY, "FP32", [-1])]


def _parameter(parameters: dict, name: str, default: int) -> int:
    if name not in parameters:
        return default
    value = parameters[name]
    kind = value.WhichOneof("parameter_choice")
    if kind in ("int64_param", "uint64_param") and getattr(value, kind) >= 0:
        return int(getattr(value, kind))
    text = value.string_param.strip()
    if kind == "string_param" and text.isascii() and text.isdigit():  # not "²" or "٣", which isdigit() accepts
        return int(text)
    shown = {"string_param": repr(value.string_param), "int64_param": str(value.int64_param)}.get(kind, kind)
    raise InvalidInput(f"parameter {name!r} must be a non-negative integer, got {shown}")


def _classification_strings(probabilities: np.ndarray, k: int, labels: list[str]) -> list[bytes]:
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [f"{row[i]:f}:{i}:{labels[i]}".encode() for row, top in zip(probabilities, order, strict=True) for i in top]


class KServeService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: InferenceCore, metrics: Metrics, max_images: int) -> None:
        self.core, self.metrics, self.max_images = core, metrics, max_images

    # -- health and metadata ------------------------------------------------------------------------------
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=not self.core.closing)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        self.core.model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self.core.ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="atop-serve", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self.core.model(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in self.core.versions[model.name]],
            platform=PLATFORM,
            inputs=[tensor(name=n, datatype=t, shape=shape) for n, t, shape in accepted_inputs(model)],
            outputs=[tensor(name=n, datatype=t, shape=shape) for n, t, shape in served_outputs(model)],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        model = self.core.model(request.name, request.version)
        batcher = self.core.config.batcher

        config = pb.ModelConfig(
            name=model.name,
            platform=PLATFORM,
            backend="onnxruntime",
            max_batch_size=batcher.max_batch_size,
            input=[  # optional: a request supplies one of them
                pb.ModelInput(name=n, data_type=_KSERVE_TO_CONFIG[t], dims=shape[1:], optional=True)
                for n, t, shape in accepted_inputs(model)
            ],
            output=[  # dims without the batch dimension, as max_batch_size > 0 implies
                pb.ModelOutput(
                    name=n,
                    data_type=_KSERVE_TO_CONFIG[t],
                    dims=shape[1:],
                    label_filename="labels.txt" if n == model.output_name else "",
                )
                for n, t, shape in served_outputs(model)
            ],
            dynamic_batching=pb.ModelDynamicBatching(max_queue_delay_microseconds=batcher.max_queue_delay_us),
            # The request parameter `draws` (RT draws averaged per image) is bounded: clients check up front.
            parameters={"max_draws": pb.ModelParameter(string_value=str(self.core.config.max_draws))},
        )
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        names = [self.core.model(request.name, request.version).name] if request.name else list(self.core.models)

        def duration(d: object) -> pb.StatisticDuration:
            return pb.StatisticDuration(count=d.count, ns=int(d.seconds * 1e9))  # type: ignore[attr-defined]

        out = []
        for name in names:
            served = self.core.models[name]
            with served.lock:
                s = served.stats
                out.append(
                    pb.ModelStatistics(
                        name=name,
                        version=str(served.loaded.version),
                        last_inference=s.last_inference_ms,
                        inference_count=s.inference_count,
                        execution_count=s.execution_count,
                        inference_stats=pb.InferStatistics(
                            success=duration(s.success),
                            fail=duration(s.fail),
                            queue=duration(s.queue),
                            compute_infer=duration(s.compute),
                        ),
                        batch_stats=[
                            pb.InferBatchStatistics(batch_size=size, compute_infer=duration(d))
                            for size, d in sorted(s.batch_compute.items())
                        ],
                    )
                )
        return pb.ModelStatisticsResponse(model_stats=out)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        state = "READY" if self.core.ready else "UNAVAILABLE"
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=name, version=str(model.loaded.version), state=state)
                for name, model in self.core.models.items()
            ]
        )

    # -- inference ----------------------------------------------------------------------------------------
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self.infer(request, call_of(context))

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One response per request, in order; a failed request is answered with error_message (its status
        code name first, e.g. "RESOURCE_EXHAUSTED: ...") and the stream goes on."""
        call = call_of(context)

        async def handle(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(infer_response=await self.infer(request, call))

        def on_error(request: pb.ModelInferRequest, code: grpc.StatusCode, message: str) -> pb.ModelStreamInferResponse:
            return pb.ModelStreamInferResponse(
                error_message=f"{code.name}: {message}", infer_response=pb.ModelInferResponse(id=request.id)
            )

        async for response in answer_each("ModelStreamInfer", self.metrics, requests, handle, on_error):
            yield response

    async def infer(self, request: pb.ModelInferRequest, call: Call) -> pb.ModelInferResponse:
        """validate -> decode -> core -> encode, for one request of either RPC."""
        model = self.core.model(request.model_name, request.model_version)
        with self.core.failures_counted(model):
            outputs = self._outputs(request, model)  # checked before the model runs
            draws = _parameter(request.parameters, "draws", 1)
            # Triton's request parameter "timeout" (microseconds; 0: none), which tritonclient's infer(timeout=)
            # sends over both protocols: the deadline for a client that sets no transport deadline (HTTP has none).
            if timeout_us := _parameter(request.parameters, "timeout", 0):
                call = call.within(timeout_us / 1e6)
            images = await self._images(request, model, draws, call)
            images_asked = tuple(name for name, _ in outputs if name in model.image_outputs)
            result = await self.core.infer(model, images, draws, call, images_asked)
        return self._response(request, model, outputs, result)

    async def _images(self, request: pb.ModelInferRequest, model: ServedModel, draws: int, call: Call) -> np.ndarray:
        """The request's images, validated; what can never be served is refused before anything is decoded."""
        if len(request.inputs) != 1:
            raise InvalidInput(
                f"model {model.name} takes exactly one input ({model.input_name}), got {len(request.inputs)}"
            )
        tensor = request.inputs[0]
        names = [name for name, _, _ in accepted_inputs(model)]
        if tensor.name not in names:
            raise InvalidInput(f"model {model.name} takes one of the inputs {names}, not {tensor.name!r}")
        shape = tuple(tensor.shape)
        if not shape or any(d <= 0 for d in shape):
            raise InvalidInput(f"input shape {list(shape)} must have only positive dimensions")
        if shape[0] > self.max_images:
            raise InvalidInput(f"{shape[0]} images exceed the limit of {self.max_images} per request")
        self.core.check_draws(shape[0], draws)
        if tensor.datatype not in _TYPED:
            raise InvalidInput(f"input datatype {tensor.datatype!r} is not BYTES (encoded images), UINT8 or FP32")
        raw = self._raw(request)
        if tensor.datatype == "BYTES":
            if shape not in ((shape[0],), (shape[0], 1)):
                raise InvalidInput(
                    f"BYTES input must have shape [N] or [N,1] (one encoded image each), got {list(shape)}"
                )
            items = split_bytes_tensor(raw, shape[0]) if raw is not None else list(tensor.contents.bytes_contents)
            if len(items) != shape[0]:
                raise InvalidInput(f"BYTES input of shape {list(shape)} holds {len(items)} elements")
            return await self.core.decode(items, model.size, call)
        if raw is not None:
            array = array_from_raw(raw, tensor.datatype, shape)
        else:
            values = getattr(tensor.contents, _TYPED[tensor.datatype])
            if len(values) != math.prod(shape):
                raise InvalidInput(f"{tensor.datatype} input of shape {list(shape)} holds {len(values)} values")
            if tensor.datatype == "UINT8" and values and max(values) > 255:
                raise InvalidInput("UINT8 contents hold values above 255")
            array = np.asarray(values, dtype=np.uint8 if tensor.datatype == "UINT8" else np.float32).reshape(shape)
        return self.core.validate_pixels(model, array)

    @staticmethod
    def _raw(request: pb.ModelInferRequest) -> bytes | None:
        if not request.raw_input_contents:
            return None
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInput(f"{len(request.raw_input_contents)} raw_input_contents for {len(request.inputs)} inputs")
        if request.inputs[0].HasField("contents"):
            raise InvalidInput("an input has both contents and raw_input_contents")
        return request.raw_input_contents[0]

    @staticmethod
    def _outputs(request: pb.ModelInferRequest, model: ServedModel) -> list[tuple[str, int]]:
        """(name, k) of each requested output; k > 0: the classification extension's top k, 0: probabilities."""
        requested = list(request.outputs) or [pb.ModelInferRequest.InferRequestedOutputTensor(name=model.output_name)]
        names = [name for name, _, _ in served_outputs(model)]
        outputs = []
        for output in requested:
            if output.name not in names:
                raise InvalidInput(f"model {model.name} has the outputs {names}, not {output.name!r}")
            k = _parameter(output.parameters, "classification", 0) or _parameter(output.parameters, "class_count", 0)
            if k and output.name != model.output_name:
                raise InvalidInput(f"the classification extension applies to {model.output_name}, not {output.name}")
            if k and not 1 <= k <= model.num_classes:
                raise InvalidInput(f"class_count must be between 1 and {model.num_classes}, got {k}")
            outputs.append((output.name, k))
        return outputs

    @staticmethod
    def _response(
        request: pb.ModelInferRequest, model: ServedModel, outputs: list[tuple[str, int]], result: Answer
    ) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(
            model_name=model.name, model_version=str(model.loaded.version), id=request_id(request.id)
        )
        probabilities = result.probabilities
        for name, k in outputs:
            if k:
                strings = _classification_strings(probabilities, k, model.loaded.labels)
                response.outputs.add(name=name, datatype="BYTES", shape=[len(probabilities), k])
                response.raw_output_contents.append(join_bytes_tensor(strings))
            else:
                values = {model.output_name: probabilities, STABILITY: result.stability, **result.images}[name]
                response.outputs.add(name=name, datatype="FP32", shape=list(values.shape))
                response.raw_output_contents.append(values.astype("<f4").tobytes())
        return response
