"""What both gRPC services share: the error mapping of unary calls (one interceptor) and of each message of a
stream, per-RPC metrics and logs, and who is calling until when.

The services run on grpc.aio: an idle stream or a request waiting on the batcher holds no thread, only a
suspended coroutine, so health checks and other clients are always answered. A client that cancels (or
whose deadline passes) has its coroutine cancelled, which withdraws its queued work (core.py).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from atop_server.core import Call
from atop_server.grpc_errors import HANDLED, code_of
from atop_server.metrics import Metrics

log = logging.getLogger("atop_server")


def call_of(context: grpc.aio.ServicerContext) -> Call:
    """The fairness key (the client's connection) and the deadline (grpc reports a huge number without one)."""
    remaining = context.time_remaining()
    deadline = None if remaining is None or remaining > 1e7 else time.monotonic() + max(remaining, 0.0)
    return Call(client=context.peer(), deadline=deadline)


def request_id(given: str) -> str:
    return given or uuid.uuid4().hex[:16]


def failure(method: str, model: str, request: Any, error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message of a failed request, logged as one JSON line with the request id. An
    unexpected error (a bug) is logged with its traceback and answered INTERNAL without internals."""
    code = code_of(error)
    record = {
        "event": "request_failed",
        "method": method,
        "model": model,
        "id": getattr(request, "id", "") or getattr(request, "request_id", ""),
        "code": code.name,
        "error": str(error),
    }
    if isinstance(error, HANDLED):
        log.warning(json.dumps(record))
        return code, str(error)
    log.error(json.dumps(record), exc_info=error)
    return code, f"internal error ({type(error).__name__}), logged by the server"


def model_of(request: Any) -> str:
    """The model a request names (ModelInfer's model_name, the metadata RPCs' name, Classify's model), or ""."""
    for field in ("model_name", "name", "model"):
        if field in type(request).DESCRIPTOR.fields_by_name:
            return getattr(request, field)
    return ""


class ServingInterceptor(grpc.aio.ServerInterceptor):
    """Every unary RPC of the given services: a failure becomes its status code with a message (grpc_errors.py),
    every call is counted and timed. Streams map errors and count per message (answer_each): a failed message
    must not end the stream. Health and reflection pass untouched (probes would swamp the request metrics)."""

    def __init__(self, metrics: Metrics, services: tuple[str, ...]) -> None:
        self.metrics, self.services = metrics, services

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service, _, method = details.method.lstrip("/").partition("/")
        if handler is None or service not in self.services or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._mapped(method, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _mapped(self, method: str, behaviour: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        metrics = self.metrics

        async def mapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, model = time.monotonic(), metrics.model_label(model_of(request))
            code = grpc.StatusCode.OK
            try:
                return await behaviour(request, context)
            except Exception as error:  # noqa: BLE001 - every failure becomes a status; bugs are logged as such
                code, message = failure(method, model, request, error)
            finally:
                metrics.record_request(method, model, code.name, time.monotonic() - started)
            await context.abort(code, message)

        return mapped


async def answer_each(
    method: str,
    metrics: Metrics,
    requests: AsyncIterator[Any],
    handle: Callable[[Any], Awaitable[Any]],
    on_error: Callable[[Any, grpc.StatusCode, str], Any],
) -> AsyncIterator[Any]:
    """A stream's responses, one per request in order: a failed request is answered by on_error(request, code,
    message) and the stream goes on; only the client ending, cancelling or its deadline passing ends it."""
    async for request in requests:
        started, model = time.monotonic(), metrics.model_label(model_of(request))
        try:
            response = await handle(request)
            code = grpc.StatusCode.OK
        except Exception as error:  # noqa: BLE001 - one message's failure is answered, the stream goes on
            code, message = failure(method, model, request, error)
            response = on_error(request, code, message)
        metrics.record_request(method, model, code.name, time.monotonic() - started)
        yield response
