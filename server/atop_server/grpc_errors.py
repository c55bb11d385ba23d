"""The one place where serving errors become gRPC status codes."""

from __future__ import annotations

import grpc

from atop_server.errors import (
    DeadlineExceeded,
    InvalidInput,
    NotReady,
    Overloaded,
)
from atop_server.repository import ModelLoadError, ModelNotFoundError

CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    ModelLoadError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
HANDLED = tuple(CODES)


def code_of(error: Exception) -> grpc.StatusCode:
    """The status of a serving error; INTERNAL for anything else (a bug: the servicers log it)."""
    for kind, code in CODES.items():
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL
