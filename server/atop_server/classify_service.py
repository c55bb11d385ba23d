"""atop.v1.Classifier: encoded images in, labels out; the same core as the KServe service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np

from atop_proto import classify_pb2 as pb
from atop_proto import classify_pb2_grpc as pb_grpc
from atop_server.core import Call, InferenceCore
from atop_server.errors import InvalidInput
from atop_server.metrics import Metrics
from atop_server.servicing import answer_each, call_of, request_id


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, core: InferenceCore, metrics: Metrics) -> None:
        self.core, self.metrics = core, metrics

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        return await self._classify(request, call_of(context))

    async def ClassifyStream(
        self, requests: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyResponse]:
        """One response per request, in order; a failed request is answered with `error` and `code` set and
        the stream goes on."""
        call = call_of(context)

        def on_error(request: pb.ClassifyRequest, code: grpc.StatusCode, message: str) -> pb.ClassifyResponse:
            return pb.ClassifyResponse(request_id=request_id(request.request_id), error=message, code=code.name)

        async for response in answer_each(
            "ClassifyStream", self.metrics, requests, lambda r: self._classify(r, call), on_error
        ):
            yield response

    async def _classify(self, request: pb.ClassifyRequest, call: Call) -> pb.ClassifyResponse:
        model = self.core.model(request.model)
        top_k = request.top_k or 1
        with self.core.failures_counted(model):
            if not 1 <= top_k <= model.num_classes:
                raise InvalidInput(f"top_k must be between 1 and {model.num_classes}, got {top_k}")
            draws = request.draws or 1
            self.core.check_draws(len(request.images), draws)
            images = await self.core.decode(list(request.images), model.size, call)
            probabilities = await self.core.classify(model, images, draws, call)
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        labels = model.loaded.labels
        results = [
            pb.Classification(
                predictions=[pb.Prediction(label=labels[i], index=int(i), score=float(row[i])) for i in top]
            )
            for row, top in zip(probabilities, order, strict=True)
        ]
        return pb.ClassifyResponse(
            request_id=request_id(request.request_id),
            model=model.name,
            model_version=str(model.loaded.version),
            results=results,
        )
