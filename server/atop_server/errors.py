"""Errors of the serving core. The core never imports grpc: the servicers map these to status codes in one
place (grpc_errors.py). Every message says what was wrong, for the client to act on."""

from __future__ import annotations


class ServeError(Exception):
    pass


class InvalidInput(ServeError):
    """Bad shape, dtype, size, value, parameter or an undecodable image: the client's to fix."""


class Overloaded(ServeError):
    """The queue is full: retry later (with backoff)."""


class NotReady(ServeError):
    """Starting up or shutting down."""


class DeadlineExceeded(ServeError):
    """The request's deadline passed before its batch ran."""


__all__ = [
    "DeadlineExceeded",
    "InvalidInput",
    "NotReady",
    "Overloaded",
    "ServeError",
]
