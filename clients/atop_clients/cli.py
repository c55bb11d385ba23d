"""atop-classify: classify many images through a KServe v2 gRPC server (atop-serve, or any server with a
compatible model), with batching, concurrency, retries, resumable output and a summary.

  atop-classify ../shared/datasets/cifar10-jpg.tar.gz --server localhost:8001 -o out.csv
  atop-classify photos/ 'more/**/*.png' @list.txt --top-k 3
  atop-classify ../shared/datasets/cifar10-jpg.tar.gz -o out.csv --resume    # after an interruption

The last line on stderr is a JSON summary of the whole output file. Exit code 0 when every input was
classified, 1 when any failed (the failures are listed), 2 on bad usage (checked before any image is sent),
130 on Ctrl-C (the rows so far are kept: rerun with --resume).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc
from tqdm import tqdm

from atop_clients.client import AtopClient, ClientConfig
from atop_clients.inputs import Item, expand
from atop_clients.output import FORMATS, OutputError, Previous, Tally, Writer, format_for, read_previous
from atop_clients.protocol import ImageError, ModelInput, Prediction

Result = tuple[Item, list[Prediction] | None, str]  # (item, predictions or None, error)
INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


class UsageError(ValueError):
    """Options the server cannot serve (an unknown model, --top-k or --draws over its limits): exit code 2."""


@dataclass(frozen=True)
class ClassifyConfig:
    server: str
    model: str | None  # None: the server's only model
    top_k: int
    draws: int
    batch_size: int
    concurrency: int
    output: Path | None
    format: str
    resume: bool
    client: ClientConfig


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


def check_model(client: AtopClient, config: ClassifyConfig) -> ModelInput:
    """The model to use, with --top-k and --draws checked against the server's limits once, before any image."""
    served = client.models()
    if config.model is None and len(served) != 1:
        raise UsageError(f"{config.server} serves {len(served)} models ({', '.join(served)}): choose one with --model")
    model = config.model or served[0]
    if model not in served:
        raise UsageError(f"{config.server} serves no model {model!r}; it serves: {', '.join(served)}")
    try:
        spec = client.model_input(model)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if spec.classes and config.top_k > spec.classes:
        raise UsageError(f"--top-k {config.top_k}: model {model} has {spec.classes} classes")
    max_draws = client.max_draws(model)
    if max_draws is not None and config.draws > max_draws:
        raise UsageError(f"--draws {config.draws}: {config.server} allows at most {max_draws} (atop-serve --max-draws)")
    return spec


def resume_file(config: ClassifyConfig) -> Previous:
    """--resume: the output's classified rows, rewritten without its failures (they are retried now, and
    would otherwise be listed twice); without --resume the output starts empty."""
    if not (config.resume and config.output):
        return Previous()
    previous = read_previous(config.output, config.format, config.top_k)
    partial = config.output.with_name(config.output.name + ".partial")
    with open(partial, "w", newline="") as out:
        writer = Writer(out, config.format, config.top_k, header=True)
        for row in previous.rows:
            writer.write_row(row)
    partial.replace(config.output)  # at once: an interruption leaves the old file or the new one
    return previous


def run(config: ClassifyConfig, items: list[Item], previous: Previous, tally: Tally, failures: list[Result]) -> None:
    """Classify what the output does not hold yet, adding each row to `tally` (and each failure to `failures`)."""
    todo = [item for item in items if item.key not in previous.keys]
    batches = [todo[i : i + config.batch_size] for i in range(0, len(todo), config.batch_size)]
    appending = config.resume and config.output is not None  # resume_file wrote the header and earlier rows
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(config.concurrency))
        client = stack.enter_context(AtopClient(config.server, config.client))
        spec = check_model(client, config)  # before the output is opened: a refused run leaves it untouched
        out = (
            stack.enter_context(open(config.output, "a" if appending else "w", newline=""))
            if config.output
            else sys.stdout
        )
        writer = Writer(out, config.format, config.top_k, header=not appending)
        bar = stack.enter_context(tqdm(total=len(todo), unit="img", file=sys.stderr, disable=not todo))
        try:
            for results in pool.map(
                lambda b: classify_batch(client, b, spec.model, config.top_k, config.draws), batches
            ):
                for item, predictions, error in results:
                    writer.write(item, predictions, error)
                    correct = predictions is not None and predictions[0].label == item.label
                    tally.add(predictions is not None, item.label, correct)
                    if predictions is None:
                        failures.append((item, predictions, error))
                bar.update(len(results))
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            client.close()  # ends the requests in flight, so that their threads stop at once
            raise


def summarize(items: list[Item], previous: Previous, tally: Tally, failures: list[Result], seconds: float) -> None:
    """Each failure, then one JSON line about the whole output (earlier runs' rows included): always the
    last line on stderr, for scripts to read."""
    for item, _, error in failures:
        print(f"FAILED {item.key}: {error}", file=sys.stderr)
    classified_now = tally.classified - previous.tally.classified
    summary = {
        "inputs": len(items),
        "skipped": sum(item.key in previous.keys for item in items),
        "classified": tally.classified,
        "failed": tally.failed,
        "accuracy": tally.correct / tally.labelled if tally.labelled else None,
        "labelled": tally.labelled,
        "seconds": round(seconds, 2),
        "images_per_second": round(classified_now / seconds, 1) if seconds else None,
    }
    print(json.dumps(summary), file=sys.stderr)


def positive(kind: type) -> object:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


class OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one line (argparse prints the whole usage first, which buries the message)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help: every option)\n")


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, ClassifyConfig, list[str]]:
    parser = OneLineErrors(
        prog="atop-classify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="+", help="files, folders, globs, .tar/.tar.gz, @list.txt")
    parser.add_argument("--server", default="localhost:8001", help="gRPC address (default: %(default)s)")
    parser.add_argument("--model", help="model to use (default: the server's only model; RepositoryIndex)")
    parser.add_argument("--top-k", type=positive(int), default=1, help="labels per image (default: %(default)s)")
    parser.add_argument(
        "--draws",
        type=positive(int),
        default=1,
        help="RT draws averaged per image (atop-serve's `draws`; costs K passes; default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=positive(int), default=32, help="images per request (default: %(default)s)"
    )
    parser.add_argument(
        "--concurrency", type=positive(int), default=4, help="requests in flight (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout", type=positive(float), default=60.0, help="deadline per request attempt, s (default: %(default)s)"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=5,
        help="extra attempts on UNAVAILABLE / RESOURCE_EXHAUSTED, with backoff (default: %(default)s)",
    )
    parser.add_argument(
        "--format", choices=FORMATS, help="output format (default: from -o's extension, .csv or .jsonl; else table)"
    )
    parser.add_argument("-o", "--output", type=Path, help="output file (default: stdout)")
    parser.add_argument(
        "--resume", action="store_true", help="skip inputs already classified in --output; retry its failures"
    )
    parser.add_argument("--tls", action="store_true", help="TLS with the system's roots (or --ca-cert)")
    parser.add_argument("--ca-cert", type=Path, help="PEM root certificates for TLS (default: the system's)")
    parser.add_argument("--client-cert", type=Path, help="PEM client certificate (mutual TLS; with --client-key)")
    parser.add_argument("--client-key", type=Path, help="PEM private key of --client-cert")
    parser.add_argument("--token", default="", help="bearer token (default: env ATOP_TOKEN, else none); needs --tls")
    parser.add_argument(
        "--insecure-token", action="store_true", help="send the token without TLS (a trusted network only)"
    )
    args = parser.parse_args(argv)
    if args.resume and not args.output:
        parser.error("--resume needs --output")
    if args.retries < 0:
        parser.error(f"argument --retries: must be 0 or more, got {args.retries}")
    pem = {}
    for option in ("ca_cert", "client_cert", "client_key"):
        path = getattr(args, option)
        try:
            pem[option] = path.read_bytes() if path else None
        except OSError as error:
            parser.error(f"argument --{option.replace('_', '-')}: {error}")
    try:
        client = ClientConfig(
            timeout=args.timeout,
            retries=args.retries,
            tls=args.tls or bool(args.ca_cert or args.client_cert),
            root_certificates=pem["ca_cert"],
            client_certificate=pem["client_cert"],
            client_key=pem["client_key"],
            token=args.token or os.environ.get("ATOP_TOKEN", ""),
            insecure_token=args.insecure_token,
        )
    except ValueError as error:
        parser.error(f"--token / ATOP_TOKEN: {error} (--tls, --insecure-token)")
    config = ClassifyConfig(
        server=args.server,
        model=args.model,
        top_k=args.top_k,
        draws=args.draws,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        output=args.output,
        format=format_for(args.output, args.format),
        resume=args.resume,
        client=client,
    )
    return parser, config, args.inputs


def main(argv: list[str] | None = None) -> None:
    parser, config, sources = parse_args(argv)
    try:
        items = list(expand(sources))
        previous = resume_file(config)
    except (FileNotFoundError, OutputError) as error:
        parser.error(str(error))
    tally, failures = dataclasses.replace(previous.tally), []
    started = time.monotonic()
    code = 0
    try:
        run(config, items, previous, tally, failures)
    except UsageError as error:
        parser.error(str(error))
    except grpc.RpcError as error:  # the up-front checks found no server (every retry spent)
        parser.exit(1, f"atop-classify: error: {config.server}: {error.code().name}: {error.details()}\n")
    except KeyboardInterrupt:
        code = INTERRUPTED
    if code == INTERRUPTED:
        print(f"interrupted: {how_to_resume(config, argv)}", file=sys.stderr)
    summarize(items, previous, tally, failures, time.monotonic() - started)
    sys.exit(code or (1 if failures else 0))


def how_to_resume(config: ClassifyConfig, argv: list[str] | None) -> str:
    if not config.output:
        return "the rows so far went to stdout; with -o FILE a rerun with --resume continues where one stopped"
    command = shlex.join(["atop-classify", *(sys.argv[1:] if argv is None else argv)])
    return f"the rows so far are in {config.output}; to continue: {command}{'' if config.resume else ' --resume'}"


if __name__ == "__main__":
    main()
