"""atop.v1.Classifier: encoded images in, labels out; the same core as the KServe service."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np

from atop_proto import classify_pb2 as pb
from atop_proto import classify_pb2_grpc as pb_grpc
from atop_server.core import InferenceCore
from atop_server.errors import InvalidInput
from atop_server.metrics import Metrics
from atop_server.servicing import cancellation_token, request_id, rpc, time_left


class ClassifierService(pb_grpc.ClassifierServicer):
    def __init__(self, core: InferenceCore, metrics: Metrics) -> None:
        self.core = core
        self.Classify = rpc("Classify", metrics, lambda r: r.model)(type(self).Classify).__get__(self)

    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        return self._classify(request, context)

    def ClassifyStream(
        self, requests: Iterator[pb.ClassifyRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ClassifyResponse]:
        for request in requests:
            try:
                yield self._classify(request, context)
            except InvalidInput as error:  # a bad image fails its own request; the stream goes on
                yield pb.ClassifyResponse(request_id=request_id(request.request_id), error=str(error))

    def _classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        model = self.core.model(request.model)
        top_k = request.top_k or 1
        with self.core.failures_counted(model):
            if not 1 <= top_k <= model.num_classes:
                raise InvalidInput(f"top_k must be between 1 and {model.num_classes}, got {top_k}")
            images = self.core.decode(list(request.images), model.size)
            probabilities = self.core.classify(
                model, images, request.draws or 1, time_left(context), cancellation_token(context)
            )
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
