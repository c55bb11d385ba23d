"""The KServe v2 REST API (Open Inference Protocol over HTTP) beside gRPC, and the demo page.

Served by aiohttp on the gRPC server's asyncio loop, in front of the same core, batcher, limits, metrics,
TLS and bearer tokens. Requests are translated to the KServe gRPC messages and answered by the gRPC
servicer's own handlers, so both protocols validate and fail alike (status.py maps the errors).
"""

from atop_server.http.server import HttpConfig, HttpServer

__all__ = ["HttpConfig", "HttpServer"]
