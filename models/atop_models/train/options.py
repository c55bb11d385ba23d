"""Frozen config dataclasses <-> argparse options, so every hyperparameter is declared once, with its help.

Each field's `metadata["help"]` is its unit and reason; nested dataclasses become prefixed options
(`rt: RTConfig` -> `--rt-noise-sigma`). Tuples take several values; dicts take a JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def add_options(parser: argparse.ArgumentParser, cls: type, prefix: str = "", defaults: Any = None) -> None:
    """One option per field of `cls`; `defaults` (an instance) overrides the field defaults, so that a nested
    config's options default to what the enclosing config's factory builds, not to the nested class's own."""
    for f in dataclasses.fields(cls):
        kind = _hints(cls)[f.name]
        if defaults is not None:
            default = getattr(defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(kind):
            add_options(parser, kind, f"{prefix}{f.name}_", default)
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        # argparse %-formats help texts: a literal % (e.g. "94% accuracy") must reach it doubled.
        helptext = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        dest = prefix + f.name
        origin = typing.get_origin(kind)
        if kind is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        elif origin is tuple:
            item = typing.get_args(kind)[0]
            parser.add_argument(flag, dest=dest, type=item, nargs="+", default=default, help=helptext)
        elif kind is dict or origin is dict:
            parser.add_argument(flag, dest=dest, type=json.loads, default=default, help=helptext + " (JSON)")
        elif origin is typing.Literal:
            parser.add_argument(flag, dest=dest, choices=typing.get_args(kind), default=default, help=helptext)
        else:
            parser.add_argument(flag, dest=dest, type=kind, default=default, help=helptext)


def from_options(cls: type, args: argparse.Namespace, prefix: str = "") -> Any:
    values = {}
    for f in dataclasses.fields(cls):
        kind = _hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            values[f.name] = from_options(kind, args, f"{prefix}{f.name}_")
        else:
            value = getattr(args, prefix + f.name)
            values[f.name] = tuple(value) if typing.get_origin(kind) is tuple else value
    return cls(**values)


def help_field(default: Any, help: str) -> Any:
    """A dataclass field with its help text; mutable defaults (dicts) get a factory."""
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})
