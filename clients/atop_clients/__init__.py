"""AToP clients: a Python library (AtopClient, AsyncAtopClient) and the batch CLI atop-classify. No torch."""

from atop_clients.client import AsyncAtopClient, AtopClient, ClientConfig
from atop_clients.protocol import Prediction, Purified

__all__ = ["AsyncAtopClient", "AtopClient", "ClientConfig", "Prediction", "Purified"]
