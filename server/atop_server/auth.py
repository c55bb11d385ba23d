"""Bearer-token authentication: `authorization: Bearer <token>` (gRPC metadata, or the HTTP header of the
REST and metrics ports), checked against the configured tokens in constant time. Health checking stays open (probes
carry no token); reflection and metrics are open only when asked. Without tokens configured, every call is let
through (the interceptor is not installed).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

MIN_TOKEN_LENGTH = 16  # shorter tokens are guessable; the server refuses to start with one
_HEALTH = f"/{health.SERVICE_NAME}/"
_REFLECTION = f"/{reflection.SERVICE_NAME}/"


@dataclass(frozen=True)
class AuthConfig:
    tokens: frozenset[str] = frozenset()  # empty: no authentication
    public_reflection: bool = False  # server reflection without a token (it lists the services and messages)
    public_metrics: bool = False  # /metrics without a token (it tells request rates, models and failures)

    def __post_init__(self) -> None:
        short = [token for token in self.tokens if len(token) < MIN_TOKEN_LENGTH]
        if short:
            raise ValueError(f"{len(short)} token(s) shorter than {MIN_TOKEN_LENGTH} characters")


def read_tokens(text: str, separator: str | None = None) -> frozenset[str]:
    """Tokens from a file's text (one per line, '#' comments) or an environment variable (comma-separated)."""
    parts = text.split(separator) if separator else [line.split("#", 1)[0] for line in text.splitlines()]
    return frozenset(part.strip() for part in parts if part.strip())


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as the method's that answers UNAUTHENTICATED without reading the request."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


DENIED = "missing or wrong bearer token (authorization: Bearer <token>)"


class TokenChecker:
    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = [token.encode() for token in sorted(tokens)]

    def accepts(self, authorization: list[Any]) -> bool:
        """Whether the request's `authorization` values (exactly one is allowed) carry a configured token."""
        if len(authorization) != 1 or not isinstance(authorization[0], str):
            return False
        if not authorization[0].startswith("Bearer "):
            return False
        given = authorization[0].removeprefix("Bearer ").strip().encode()
        # Every token is compared (constant time each), so the time taken says nothing about which matched.
        return sum(hmac.compare_digest(given, token) for token in self._tokens) > 0


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self._checker = TokenChecker(config.tokens)

    def _is_open(self, method: str) -> bool:
        return method.startswith(_HEALTH) or (self.config.public_reflection and method.startswith(_REFLECTION))

    def _authorized(self, metadata: tuple) -> bool:
        return self._checker.accepts([value for key, value in metadata or () if key == "authorization"])

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or self._is_open(details.method) or self._authorized(details.invocation_metadata):
            return handler
        return _deny(handler, DENIED)
