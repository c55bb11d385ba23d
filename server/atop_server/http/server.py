"""The HTTP server: aiohttp on the gRPC server's asyncio loop, with the same body limit, TLS and bearer tokens
as gRPC. Middlewares, outermost first: errors (one JSON form, statuses from status.py) and metrics; tokens."""

from __future__ import annotations

import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from atop_server.auth import DENIED, AuthConfig, TokenChecker
from atop_server.http.routes import DEMO_HEADERS, RestApi
from atop_server.http.status import error_response, status_of
from atop_server.kserve import KServeService
from atop_server.metrics import Metrics
from atop_server.servicing import failure

if TYPE_CHECKING:
    from atop_server.app import TlsConfig

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_OPEN_PREFIXES = ("/v2/health/",)  # probes carry no token, as gRPC health is open


@dataclass(frozen=True)
class HttpConfig:
    port: int = 8000  # 0 picks a free port (logged)
    # A request body must arrive within this (408 otherwise), and a connection that starts no request within
    # it is closed: slow or stalled clients cannot hold connections for ever.
    timeout_seconds: float = 30.0
    demo: bool = True  # the demo page at / (static files; it uses the REST API like any client)


def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """The gRPC port's certificates as an SSLContext (mutual: client certificates from root_cert required)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as folder:  # load_cert_chain reads only files; the folder is private
        cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert.write_bytes(tls.server_cert)
        key.touch(mode=0o600)
        key.write_bytes(tls.server_key)
        context.load_cert_chain(cert, key)
    if tls.root_cert is not None:
        context.load_verify_locations(cadata=tls.root_cert.decode())
    if tls.mutual:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _method(request: web.Request) -> str:
    """The metrics' method label: the endpoint's handler (routes.py), marked as HTTP; a bounded set."""
    name = getattr(request.match_info.route.handler, "__name__", "").strip("_")
    return f"http.{name or 'unrouted'}"


def _message(request: web.Request, error: web.HTTPException) -> str:
    """aiohttp's own errors, said in a way that helps the caller (its texts are "404: Not Found")."""
    if isinstance(error, web.HTTPMethodNotAllowed):
        return (
            f"{request.method} is not allowed on {request.path} (allowed: {', '.join(sorted(error.allowed_methods))})"
        )
    if isinstance(error, web.HTTPNotFound) and request.match_info.route.resource is None:
        return f"no endpoint at {request.path}: see /v2/openapi.json"
    return error.text or error.reason


async def _demo_headers(request: web.Request, response: web.StreamResponse) -> None:
    if not request.path.startswith("/v2"):
        response.headers.update(DEMO_HEADERS)


class HttpServer:
    def __init__(
        self,
        config: HttpConfig,
        service: KServeService,
        metrics: Metrics,
        max_body_bytes: int,
        auth: AuthConfig,
        tls: TlsConfig | None,
    ) -> None:
        self.config, self.metrics, self.auth, self.tls = config, metrics, auth, tls
        self._tokens = TokenChecker(auth.tokens)
        self.app = web.Application(
            client_max_size=max_body_bytes, middlewares=[self._errors_and_metrics, self._authenticate]
        )
        api = RestApi(service, max_body_bytes, config.timeout_seconds)
        self.app.add_routes(api.routes() + (api.demo_routes() if config.demo else []))
        self.app.on_response_prepare.append(_demo_headers)
        self.runner: web.AppRunner | None = None

    async def start(self, host: str, grace_seconds: float) -> int:
        """Bind and serve; returns the port. OSError when the address cannot be bound."""
        self.runner = web.AppRunner(
            self.app,
            handler_cancellation=True,  # a client that goes away withdraws its queued work, as over gRPC
            shutdown_timeout=grace_seconds,
            keepalive_timeout=self.config.timeout_seconds,
            # After an early answer (413, 408) the rest of a body is drained briefly, so that the client can
            # read the answer before the connection closes; no longer than a body may take.
            lingering_time=min(self.config.timeout_seconds, 10.0),
            access_log=None,
        )
        await self.runner.setup()
        context = ssl_context(self.tls) if self.tls is not None else None
        site = web.TCPSite(self.runner, host, self.config.port, ssl_context=context, reuse_port=False)
        try:
            await site.start()
        except OSError:
            await self.runner.cleanup()
            raise
        return self.runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop accepting; requests under way get the grace period to finish."""
        if self.runner is not None:
            await self.runner.cleanup()

    @web.middleware
    async def _errors_and_metrics(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started, method = time.monotonic(), _method(request)
        model = self.metrics.model_label(request.match_info.get("model", ""))
        try:
            response = await handler(request)
        except web.HTTPException as error:  # aiohttp's own: no route (404), wrong method (405), 413, 408
            if error.status < 400:
                raise
            response = error_response(error.status, _message(request, error))
            if isinstance(error, web.HTTPRequestTimeout | web.HTTPRequestEntityTooLarge):
                response.force_close()  # the rest of the body is not worth waiting for, nor reading
        except Exception as error:  # noqa: BLE001 - every failure becomes a status; bugs are logged as such
            code, message = failure(method, model, request, error)
            response = error_response(status_of(code), message)
        self.metrics.record_request(method, model, str(response.status), time.monotonic() - started)
        return response

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.auth.tokens or request.path.startswith(_OPEN_PREFIXES) or not request.path.startswith("/v2"):
            return await handler(request)
        if not self._tokens.accepts(request.headers.getall("Authorization", [])):
            return error_response(401, DENIED)
        return await handler(request)
