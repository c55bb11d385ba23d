"""The one place where serving errors become HTTP statuses: from their gRPC status code (grpc_errors.py
maps the errors), so that both protocols answer a failure alike. Every error body is {"error": message}."""

from __future__ import annotations

import grpc
from aiohttp import web

# As grpc-gateway and Triton map them; 429 and 503 invite a retry with backoff, as the gRPC codes do.
STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def status_of(code: grpc.StatusCode) -> int:
    return STATUS.get(code, 500)


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
