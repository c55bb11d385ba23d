"""A small name -> constructor registry (timm style), so configs name architectures instead of importing them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


class Registry:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., nn.Module]] = {}

    def register(self, name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
        def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = builder
            return builder

        return add

    def names(self) -> list[str]:
        return sorted(self._builders)

    def create(self, name: str, **kwargs: Any) -> nn.Module:
        if name not in self._builders:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._builders[name](**kwargs)
