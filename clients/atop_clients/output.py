"""atop-classify's output: CSV, JSON lines or a table, one row per input; reading a file back for --resume."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from atop_clients.inputs import Item
from atop_clients.protocol import Prediction

FORMATS = ("csv", "jsonl", "table")
RESUMABLE = ("csv", "jsonl")
JSONL_KEYS = ["path", "true_label", "correct", "error", "predictions"]


class OutputError(ValueError):
    """An output file --resume cannot continue (another format or --top-k): the user's to fix."""


def format_for(output: Path | None, given: str | None) -> str:
    """--format when given, else the output file's extension (.csv, .jsonl), else a table."""
    if given:
        return given
    suffix = output.suffix.lower().lstrip(".") if output else ""
    return suffix if suffix in RESUMABLE else "table"


def csv_columns(top_k: int) -> list[str]:
    ranked = [f"{kind}{i + 1}" for i in range(top_k) for kind in ("label", "score")]
    return ["path", *ranked, "true_label", "correct", "error"]


@dataclass
class Tally:
    """Rows of an output file: how many classified (with how many labelled and right) and failed."""

    classified: int = 0
    failed: int = 0
    labelled: int = 0
    correct: int = 0

    def add(self, classified: bool, label: str | None, correct: bool) -> None:
        self.classified += classified
        self.failed += not classified
        if classified and label:
            self.labelled += 1
            self.correct += correct


@dataclass
class Previous:
    """The classified rows of an existing output file (its failures are dropped, so they are retried)."""

    rows: list[dict] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)
    tally: Tally = field(default_factory=Tally)


def read_previous(path: Path, fmt: str, top_k: int) -> Previous:
    """An output file of the same format and --top-k, for --resume; OutputError when it is not one."""
    if fmt not in RESUMABLE:
        raise OutputError(f"--resume needs a csv or jsonl output (-o out.csv, -o out.jsonl or --format), not {fmt}")
    text = path.read_text() if path.exists() else ""
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # a row cut short (the process was killed while writing it)
    rows = _csv_rows(path, text, top_k) if fmt == "csv" else _jsonl_rows(path, text, top_k)
    previous = Previous()
    for row in rows:
        if row["error"]:
            continue
        previous.rows.append(row)
        previous.keys.add(row["path"])
        correct = row["correct"] in (True, "1")
        previous.tally.add(True, row["true_label"], correct)
    return previous


def _csv_rows(path: Path, text: str, top_k: int) -> list[dict]:
    if not text:
        return []
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames != csv_columns(top_k):
        raise OutputError(
            f"{path} has the columns {reader.fieldnames}, not those of a csv with --top-k {top_k}: "
            "resume with the options that wrote it, or write to another -o"
        )
    return list(reader)


def _jsonl_rows(path: Path, text: str, top_k: int) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise OutputError(f"{path} line {number} is not JSON: not a jsonl output of atop-classify") from None
        if not isinstance(row, dict) or list(row) != JSONL_KEYS:
            raise OutputError(f"{path} line {number} has not the keys {JSONL_KEYS}: not a jsonl output")
        if not row["error"] and len(row["predictions"]) != top_k:
            raise OutputError(
                f"{path} holds {len(row['predictions'])} predictions per image, not --top-k {top_k}: "
                "resume with the options that wrote it, or write to another -o"
            )
        rows.append(row)
    return rows


class Writer:
    def __init__(self, out: TextIO, fmt: str, top_k: int, header: bool) -> None:
        self.out, self.fmt, self.top_k = out, fmt, top_k
        self.csv = csv.DictWriter(out, csv_columns(top_k)) if fmt == "csv" else None
        if self.csv and header:
            self.csv.writeheader()
        if fmt == "table" and header:
            out.write(f"{'path':<48} {'prediction':<14} {'score':>6}  {'true':<12}\n")

    def write_row(self, row: dict) -> None:
        """A row as read_previous returns it."""
        if self.csv:
            self.csv.writerow(row)
        else:
            self.out.write(json.dumps(row) + "\n")

    def write(self, item: Item, predictions: list[Prediction] | None, error: str) -> None:
        correct = None if predictions is None or item.label is None else predictions[0].label == item.label
        if self.fmt == "jsonl":
            record = {
                "path": item.key,
                "true_label": item.label,
                "correct": correct,
                "error": error or None,
                "predictions": [vars(p) for p in predictions or []],
            }
            self.out.write(json.dumps(record) + "\n")
        elif self.csv:
            row = {
                "path": item.key,
                "true_label": item.label or "",
                "error": error,
                "correct": "" if correct is None else int(correct),
            }
            for i, p in enumerate(predictions or []):
                row[f"label{i + 1}"], row[f"score{i + 1}"] = p.label, f"{p.score:.6f}"
            self.csv.writerow(row)
        else:
            best = predictions[0] if predictions else None
            shown = f"{best.label:<14} {best.score:6.3f}" if best else f"{'ERROR':<14} {'':>6}"
            self.out.write(f"{item.key[-48:]:<48} {shown}  {item.label or '':<12}{error}\n")
        self.out.flush()
