"""What both gRPC services share: the error mapping, per-RPC metrics and logs, cancellation and deadlines."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

import grpc

from atop_server.grpc_errors import HANDLED, code_of
from atop_server.metrics import Metrics

log = logging.getLogger("atop_server")


def cancellation_token(context: grpc.ServicerContext) -> Future:
    """A future that completes when the RPC ends for any reason (the core stops waiting when it is done)."""
    token: Future = Future()

    def finish() -> None:
        with contextlib.suppress(InvalidStateError):
            token.set_result(None)

    context.add_callback(finish)
    return token


def time_left(context: grpc.ServicerContext) -> float | None:
    """Seconds to the client's deadline; None without one (grpc reports a huge number then)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > 1e7 else max(remaining, 0.0)


def request_id(given: str) -> str:
    return given or uuid.uuid4().hex[:16]


def rpc(method: str, metrics: Metrics, model_of: Callable[[Any], str] = lambda request: "") -> Callable:
    """Wrap a unary handler: serving errors become their status code with the error's message; every call is
    counted and timed; failures are logged as one JSON line with the request id."""

    def decorate(handler: Callable) -> Callable:
        @functools.wraps(handler)
        def wrapped(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            started, model = time.monotonic(), metrics.model_label(model_of(request))
            code = grpc.StatusCode.OK
            try:
                return handler(self, request, context)
            except HANDLED as error:
                code = code_of(error)
                log.warning(
                    json.dumps(
                        {
                            "event": "request_failed",
                            "method": method,
                            "model": model,
                            "id": getattr(request, "id", "") or getattr(request, "request_id", ""),
                            "code": code.name,
                            "error": str(error),
                        }
                    )
                )
                context.abort(code, str(error))
            finally:
                metrics.requests.labels(method, model, code.name).inc()
                metrics.request_seconds.labels(method, model).observe(time.monotonic() - started)

        return wrapped

    return decorate
