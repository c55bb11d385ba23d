"""The REST endpoints of the KServe v2 protocol (Triton's paths). Each builds the gRPC request message and has
the gRPC servicer's own handler answer it, then writes the answer as JSON: one implementation of validation,
statistics and errors for both protocols."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from aiohttp import web

from atop_proto import grpc_service_pb2 as pb
from atop_server.core import Call
from atop_server.http.messages import to_json
from atop_server.http.tensors import HEADER_LENGTH, infer_request, infer_response, parse_body
from atop_server.kserve import KServeService

OPENAPI = Path(__file__).with_name("openapi.json")
DEMO = Path(__file__).with_name("demo")  # the demo page's static files (index.html, demo.js, demo.css)
# The page loads only its own files and talks only to its own origin; images are shown from data: URLs.
DEMO_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
# Every model route, with and without a version (Triton's /v2/models/<m>[/versions/<v>]).
MODEL_PATHS = ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")


class RestApi:
    """Handlers calling KServeService's own: those raise the serving errors, which the error middleware maps
    (server.py) as the gRPC interceptor does for gRPC. None of them but infer reads the gRPC context."""

    def __init__(self, service: KServeService, max_body_bytes: int, timeout_seconds: float) -> None:
        self.service, self.max_body_bytes, self.timeout_seconds = service, max_body_bytes, timeout_seconds

    def demo_routes(self) -> list[web.AbstractRouteDef]:
        return [web.get("/", self.demo_page), web.static("/demo", DEMO)]

    async def demo_page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(DEMO / "index.html")

    def routes(self) -> list[web.RouteDef]:
        routes = [
            web.get("/v2", self.server_metadata),
            web.get("/v2/health/live", self.live),
            web.get("/v2/health/ready", self.ready),
            web.post("/v2/repository/index", self.repository_index),
            web.get("/v2/models/stats", self.statistics),
            web.get("/v2/openapi.json", self.openapi),
        ]
        for path in MODEL_PATHS:
            routes += [
                web.get(path, self.model_metadata),
                web.get(path + "/ready", self.model_ready),
                web.get(path + "/config", self.model_config),
                web.get(path + "/stats", self.statistics),
                web.post(path + "/infer", self.infer),
            ]
        return routes

    @staticmethod
    def _model(request: web.Request) -> tuple[str, str]:
        return request.match_info.get("model", ""), request.match_info.get("version", "")

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(to_json(await self.service.ServerMetadata(pb.ServerMetadataRequest(), None)))

    async def live(self, request: web.Request) -> web.Response:
        live = (await self.service.ServerLive(pb.ServerLiveRequest(), None)).live
        return web.json_response({"live": live}, status=200 if live else 503)

    async def ready(self, request: web.Request) -> web.Response:
        ready = (await self.service.ServerReady(pb.ServerReadyRequest(), None)).ready
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        message = pb.ModelReadyRequest(name=name, version=version)
        ready = (await self.service.ModelReady(message, None)).ready
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        message = pb.ModelMetadataRequest(name=name, version=version)
        return web.json_response(to_json(await self.service.ModelMetadata(message, None)))

    async def model_config(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        message = pb.ModelConfigRequest(name=name, version=version)
        response = await self.service.ModelConfig(message, None)
        return web.json_response(to_json(response.config))  # Triton answers the config itself, unwrapped

    async def statistics(self, request: web.Request) -> web.Response:
        name, version = self._model(request)
        message = pb.ModelStatisticsRequest(name=name, version=version)
        return web.json_response(to_json(await self.service.ModelStatistics(message, None)))

    async def repository_index(self, request: web.Request) -> web.Response:
        index = await self.service.RepositoryIndex(pb.RepositoryIndexRequest(), None)
        return web.json_response([to_json(model) for model in index.models])  # a list, as Triton's

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(json.loads(OPENAPI.read_text()))

    async def infer(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        # Parsing and writing JSON of up to --max-message-mb runs in a thread: the loop serves gRPC and health too.
        length = request.headers.get(HEADER_LENGTH)
        message = await asyncio.to_thread(self._message, body, length, *self._model(request))
        peer: Any = request.transport.get_extra_info("peername") if request.transport else None
        # The fairness key is the connection, as gRPC's peer is (host and port).
        call = Call(client=f"http:{peer[0]}:{peer[1]}" if peer else "http")
        response = await self.service.infer(message, call)
        header, data = await asyncio.to_thread(infer_response, message, response)
        if not data:
            return web.Response(body=header, content_type="application/json")
        answer = web.Response(body=header + data, content_type="application/octet-stream")
        answer.headers[HEADER_LENGTH] = str(len(header))
        return answer

    @staticmethod
    def _message(body: bytes, header_length: str | None, model: str, version: str) -> pb.ModelInferRequest:
        document, binary = parse_body(body, header_length)
        return infer_request(document, binary, model, version)

    async def _body(self, request: web.Request) -> bytes:
        """The whole body, refused at once when announced too large (413), or when it does not arrive in time
        (408: a slow or stalled client holds nothing else up, but not its connection forever)."""
        too_large = web.HTTPRequestEntityTooLarge(
            self.max_body_bytes,
            request.content_length or 0,
            text=f"the request body exceeds the limit of {self.max_body_bytes} bytes (the server's --max-message-mb)",
        )
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise too_large
        try:
            async with asyncio.timeout(self.timeout_seconds):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:  # a chunked body, counted as it came
            raise too_large from None
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                text=f"the request body did not arrive within {self.timeout_seconds:g} s"
            ) from None
