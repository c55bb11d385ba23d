"""Python clients for image classification over KServe v2 gRPC: AtopClient (sync) and AsyncAtopClient.

    from atop_clients import AtopClient
    with AtopClient("localhost:8001") as client:
        predictions = client.classify([open("cat.jpg", "rb").read()], top_k=3)
        print(predictions[0][0].label, predictions[0][0].score)

Retries with exponential backoff and full jitter on UNAVAILABLE and RESOURCE_EXHAUSTED; a deadline per
request; TLS and a bearer token on request.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from atop_clients.protocol import ModelInput, Prediction, Purified, infer_request, parse_purified, parse_response
from atop_proto import grpc_service_pb2 as pb
from atop_proto import grpc_service_pb2_grpc as pb_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
T = TypeVar("T")


@dataclass(frozen=True)
class ClientConfig:
    timeout: float = 30.0  # seconds, per request attempt (the gRPC deadline)
    retries: int = 5  # extra attempts on UNAVAILABLE / RESOURCE_EXHAUSTED
    backoff_base: float = 0.1  # seconds before the first retry; doubles each time
    backoff_max: float = 5.0  # cap of one wait
    tls: bool = False
    root_certificates: bytes | None = None  # PEM; None: the system's roots
    client_certificate: bytes | None = None  # PEM chain, for servers that ask for one (mutual TLS)
    client_key: bytes | None = None  # PEM private key of client_certificate
    token: str = ""  # sent as "authorization: Bearer <token>"
    insecure_token: bool = False  # send the token without TLS (anyone on the path can read and reuse it)
    max_message_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.token and not self.tls and not self.insecure_token:
            raise ValueError(
                "refusing to send a bearer token over plaintext: use TLS (tls=True), or insecure_token=True "
                "on a network you trust"
            )


def backoff(attempt: int, config: ClientConfig) -> float:
    """Full jitter (AWS architecture blog): uniform in [0, min(cap, base * 2^attempt)]."""
    return random.uniform(0, min(config.backoff_max, config.backoff_base * 2**attempt))


def _channel_options(config: ClientConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]


def _credentials(config: ClientConfig) -> grpc.ChannelCredentials | None:
    if not config.tls:
        return None
    return grpc.ssl_channel_credentials(config.root_certificates, config.client_key, config.client_certificate)


def _metadata(config: ClientConfig) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {config.token}"),) if config.token else ()


def _results(
    response: pb.ModelInferResponse, count: int, top_k: int, purified: bool
) -> list[list[Prediction]] | list[Purified]:
    return parse_purified(response, count, top_k) if purified else parse_response(response, count, top_k)


class AtopClient:
    def __init__(self, address: str, config: ClientConfig = ClientConfig()) -> None:
        self.config = config
        credentials = _credentials(config)
        options = _channel_options(config)
        self.channel = (
            grpc.secure_channel(address, credentials, options)
            if credentials
            else grpc.insecure_channel(address, options)
        )
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self._inputs: dict[str, ModelInput] = {}

    def __enter__(self) -> AtopClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Callable[..., T], request: object) -> T:
        for attempt in range(self.config.retries + 1):
            try:
                return method(request, timeout=self.config.timeout, metadata=_metadata(self.config))
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE or attempt == self.config.retries:
                    raise
                time.sleep(backoff(attempt, self.config))
        raise AssertionError("unreachable")

    def ready(self) -> bool:
        return self._call(self.stub.ServerReady, pb.ServerReadyRequest()).ready

    def model_input(self, model: str) -> ModelInput:
        if model not in self._inputs:
            metadata = self._call(self.stub.ModelMetadata, pb.ModelMetadataRequest(name=model))
            self._inputs[model] = ModelInput.from_metadata(metadata)
        return self._inputs[model]

    def models(self) -> list[str]:
        """The models the server holds (RepositoryIndex)."""
        return [m.name for m in self._call(self.stub.RepositoryIndex, pb.RepositoryIndexRequest()).models]

    def max_draws(self, model: str) -> int | None:
        """atop-serve's bound on the `draws` parameter (a ModelConfig parameter); None where not declared."""
        config = self._call(self.stub.ModelConfig, pb.ModelConfigRequest(name=model)).config
        return int(config.parameters["max_draws"].string_value) if "max_draws" in config.parameters else None

    def classify(
        self,
        images: list[bytes],
        model: str = "atop_cifar10",
        top_k: int = 1,
        request_id: str = "",
        draws: int = 1,
        return_purified: bool = False,
    ) -> list[list[Prediction]] | list[Purified]:
        """Top-k predictions (best first) for each encoded image; draws > 1 averages that many RT draws.
        return_purified: a Purified per image instead (the predictions, the stability over the draws, the RT'd
        and the purified image of the first draw)."""
        request = infer_request(self.model_input(model), images, top_k, request_id, draws, return_purified)
        return _results(self._call(self.stub.ModelInfer, request), len(images), top_k, return_purified)


class AsyncAtopClient:
    """The asyncio twin of AtopClient (grpc.aio), for many requests in flight from one thread."""

    def __init__(self, address: str, config: ClientConfig = ClientConfig()) -> None:
        self.config = config
        credentials = _credentials(config)
        options = _channel_options(config)
        self.channel = (
            grpc.aio.secure_channel(address, credentials, options)
            if credentials
            else grpc.aio.insecure_channel(address, options)
        )
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self._inputs: dict[str, ModelInput] = {}

    async def __aenter__(self) -> AsyncAtopClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: object) -> T:
        for attempt in range(self.config.retries + 1):
            try:
                return await method(request, timeout=self.config.timeout, metadata=_metadata(self.config))
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE or attempt == self.config.retries:
                    raise
                await asyncio.sleep(backoff(attempt, self.config))
        raise AssertionError("unreachable")

    async def ready(self) -> bool:
        return (await self._call(self.stub.ServerReady, pb.ServerReadyRequest())).ready

    async def model_input(self, model: str) -> ModelInput:
        if model not in self._inputs:
            metadata = await self._call(self.stub.ModelMetadata, pb.ModelMetadataRequest(name=model))
            self._inputs[model] = ModelInput.from_metadata(metadata)
        return self._inputs[model]

    async def classify(
        self,
        images: list[bytes],
        model: str = "atop_cifar10",
        top_k: int = 1,
        request_id: str = "",
        draws: int = 1,
        return_purified: bool = False,
    ) -> list[list[Prediction]] | list[Purified]:
        request = infer_request(await self.model_input(model), images, top_k, request_id, draws, return_purified)
        return _results(await self._call(self.stub.ModelInfer, request), len(images), top_k, return_purified)
