"""atop-classify: classify many images through a KServe v2 gRPC server (atop-serve, or any server with a
compatible model), with batching, concurrency, retries, resumable output and a summary.

  atop-classify ../shared/datasets/cifar10-jpg.tar.gz --server localhost:8001 --format csv -o out.csv
  atop-classify photos/ 'more/**/*.png' @list.txt --top-k 3 --format table
Exit code 0 when every input was classified, 1 when any failed (the failures are listed), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

import grpc
from tqdm import tqdm

from atop_clients.client import AtopClient, ClientConfig
from atop_clients.inputs import Item, expand
from atop_clients.protocol import ImageError, Prediction

Result = tuple[Item, list[Prediction] | None, str]  # (item, predictions or None, error)


def done_keys(path: Path, fmt: str) -> set[str]:
    """Inputs already in an output file (for --resume): classified ones only, so failures are retried."""
    if not path.exists():
        return set()
    text = path.read_text()
    if fmt == "jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        raise SystemExit("--resume needs --format csv or jsonl")
    return {row["path"] for row in rows if not row.get("error")}


class Writer:
    def __init__(self, out: TextIO, fmt: str, top_k: int, header: bool) -> None:
        self.out, self.fmt, self.top_k = out, fmt, top_k
        columns = ["path"] + [f"{kind}{i + 1}" for i in range(top_k) for kind in ("label", "score")]
        self.columns = [*columns, "true_label", "correct", "error"]
        self.csv = csv.DictWriter(out, self.columns) if fmt == "csv" else None
        if self.csv and header:
            self.csv.writeheader()
        if fmt == "table" and header:
            out.write(f"{'path':<48} {'prediction':<14} {'score':>6}  {'true':<12}\n")

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


def classify_batch(client: AtopClient, batch: list[Item], model: str, top_k: int, draws: int = 1) -> list[Result]:
    """One request per batch; a batch the server refuses as invalid is retried image by image, so one bad
    file fails alone and the others are still classified."""
    try:
        images = [item.read() for item in batch]
    except OSError as error:
        return [(item, None, f"cannot read: {error}") for item in batch]
    try:
        predictions = client.classify(images, model, top_k, draws=draws)
        return [(item, p, "") for item, p in zip(batch, predictions, strict=True)]
    except (grpc.RpcError, ImageError) as error:
        invalid = isinstance(error, ImageError) or error.code() == grpc.StatusCode.INVALID_ARGUMENT
        if invalid and len(batch) > 1:
            return [r for item in batch for r in classify_batch(client, [item], model, top_k, draws)]
        message = str(error) if isinstance(error, ImageError) else f"{error.code().name}: {error.details()}"
        return [(item, None, message) for item in batch]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="atop-classify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="+", help="files, folders, globs, .tar/.tar.gz, @list.txt")
    parser.add_argument("--server", default="localhost:8001", help="gRPC address")
    parser.add_argument("--model", default="atop_cifar10")
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument(
        "--draws", type=int, default=1, help="RT draws averaged per image (atop-serve's `draws`; costs K passes)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per request")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline per request attempt, seconds")
    parser.add_argument("--retries", type=int, default=5, help="on UNAVAILABLE / RESOURCE_EXHAUSTED, with backoff")
    parser.add_argument("--format", choices=["csv", "jsonl", "table"], default="table")
    parser.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    parser.add_argument("--resume", action="store_true", help="skip inputs already classified in --output")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's roots (or --ca-cert)")
    parser.add_argument("--ca-cert", type=Path, help="PEM root certificates for TLS")
    parser.add_argument("--client-cert", type=Path, help="PEM client certificate (mutual TLS; with --client-key)")
    parser.add_argument("--client-key", type=Path, help="PEM private key of --client-cert")
    parser.add_argument("--token", default="", help="bearer token (or env ATOP_TOKEN); needs --tls")
    parser.add_argument(
        "--insecure-token", action="store_true", help="send the token without TLS (a trusted network only)"
    )
    args = parser.parse_args(argv)
    if args.resume and not args.output:
        parser.error("--resume needs --output")
    token = args.token or os.environ.get("ATOP_TOKEN", "")
    try:
        config = ClientConfig(
            timeout=args.timeout,
            retries=args.retries,
            tls=args.tls or bool(args.ca_cert or args.client_cert),
            root_certificates=args.ca_cert.read_bytes() if args.ca_cert else None,
            client_certificate=args.client_cert.read_bytes() if args.client_cert else None,
            client_key=args.client_key.read_bytes() if args.client_key else None,
            token=token,
            insecure_token=args.insecure_token,
        )
    except ValueError as error:
        parser.error(f"--token / ATOP_TOKEN: {error} (--tls, --insecure-token)")
    try:
        items = list(expand(args.inputs))
    except FileNotFoundError as error:
        parser.error(str(error))
    skip = done_keys(args.output, args.format) if args.resume else set()
    todo = [item for item in items if item.key not in skip]
    batches = [todo[i : i + args.batch_size] for i in range(0, len(todo), args.batch_size)]

    out = open(args.output, "a" if args.resume else "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    writer = Writer(out, args.format, args.top_k, header=not (args.resume and skip))
    failures: list[Result] = []
    correct = labelled = 0
    started = time.monotonic()
    with (
        AtopClient(args.server, config) as client,
        ThreadPoolExecutor(args.concurrency) as pool,
        tqdm(total=len(todo), unit="img", file=sys.stderr, disable=not todo) as bar,
    ):
        for results in pool.map(lambda b: classify_batch(client, b, args.model, args.top_k, args.draws), batches):
            for item, predictions, error in results:
                writer.write(item, predictions, error)
                if predictions is None:
                    failures.append((item, predictions, error))
                elif item.label is not None:
                    labelled += 1
                    correct += predictions[0].label == item.label
            bar.update(len(results))
    if out is not sys.stdout:
        out.close()
    seconds = time.monotonic() - started
    summary = {
        "inputs": len(items),
        "skipped": len(items) - len(todo),
        "classified": len(todo) - len(failures),
        "failed": len(failures),
        "accuracy": correct / labelled if labelled else None,
        "labelled": labelled,
        "seconds": round(seconds, 2),
        "images_per_second": round((len(todo) - len(failures)) / seconds, 1) if seconds else None,
    }
    print(json.dumps(summary), file=sys.stderr)
    for item, _, error in failures:
        print(f"FAILED {item.key}: {error}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
