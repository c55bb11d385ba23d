"""atop-classify and the Python clients against a real in-process atop-serve on an ephemeral port."""

import asyncio
import contextlib
import csv
import io
import json
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from echo_model import LABELS, expected_probabilities
from PIL import Image

from atop_clients import AsyncAtopClient, AtopClient, ClientConfig
from atop_clients.cli import main as classify
from atop_proto import grpc_service_pb2_grpc
from atop_server.app import Server, ServerConfig
from atop_server.batcher import BatcherConfig
from atop_server.core import CoreConfig, InferenceCore
from atop_server.kserve import KServeService
from atop_server.metrics import Metrics


@pytest.fixture(scope="module")
def server(tiny_repository):
    running = Server(
        ServerConfig(
            # The clients, not admission control, are tested here: no refusals because a busy machine runs slowly.
            core=CoreConfig(
                tiny_repository, models=("tiny", "tiny_uint8"), batcher=BatcherConfig(max_queue_wait_seconds=600)
            ),
            port=0,
            metrics_port=-1,
            grace_seconds=5,
        )
    )
    running.start()
    yield f"127.0.0.1:{running.port}"
    running.stop()


@pytest.fixture(scope="module")
def one_model_server(tiny_repository):
    running = Server(
        ServerConfig(core=CoreConfig(tiny_repository, models=("tiny",)), port=0, metrics_port=-1, grace_seconds=5)
    )
    running.start()
    yield f"127.0.0.1:{running.port}"
    running.stop()


@pytest.fixture(scope="module")
def images(cifar_folder) -> Path:
    """The CIFAR-10 test slice: an ImageFolder of 10 classes x 10 real JPEGs."""
    return cifar_folder / "test"


def run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        classify([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def summary_of(err: str) -> dict:
    """The JSON summary: always the last line on stderr."""
    return json.loads(err.strip().splitlines()[-1])


def one_error_line(err: str) -> str:
    """A usage error: one line on stderr, no summary, no per-image failures."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("atop-classify: error: "), err
    return lines[0]


def test_folder_to_csv_with_labels_and_summary(server, images, tmp_path, capsys):
    code, _, err = run(
        capsys,
        images,
        "--server",
        server,
        "--model",
        "tiny",
        "--format",
        "csv",
        "--top-k",
        "3",
        "-o",
        tmp_path / "out.csv",
        "--batch-size",
        "16",
        "--concurrency",
        "3",
    )
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "out.csv").open()))
    assert len(rows) == 100 and {r["true_label"] for r in rows} == {p.name for p in images.iterdir()}
    assert all(r["label1"] and float(r["score1"]) >= float(r["score3"]) for r in rows)
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["classified"] == 100 and summary["failed"] == 0 and summary["labelled"] == 100
    assert summary["accuracy"] == sum(r["correct"] == "1" for r in rows) / 100  # what the rows say
    assert all(r["correct"] == str(int(r["label1"] == r["true_label"])) for r in rows)


def test_tar_input_jsonl_and_resume(server, images, tmp_path, capsys):
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(images, arcname="test")
    out = tmp_path / "out.jsonl"
    code, _, _ = run(capsys, archive, "--server", server, "--model", "tiny_uint8", "-o", out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and len(records) == 100 and records[0]["path"].startswith(f"{archive}!test/")
    assert records[0]["true_label"] in {p.name for p in images.iterdir()} and records[0]["predictions"][0]["label"]

    out.write_text("\n".join(out.read_text().splitlines()[:40]) + "\n")  # as if interrupted after 40
    code, _, err = run(capsys, archive, "--server", server, "--model", "tiny", "-o", out, "--resume")
    summary = summary_of(err)
    assert code == 0 and summary["skipped"] == 40 and summary["classified"] == 100  # the whole file
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["path"] for r in records}) == 100
    # The whole file's accuracy: the 40 rows kept from the first run and the 60 of this one.
    assert summary["labelled"] == 100 and summary["accuracy"] == sum(r["correct"] for r in records) / 100


def test_resume_replaces_a_failed_row_instead_of_adding_one(server, images, tmp_path, capsys):
    folder = tmp_path / "mixed" / "cat"
    folder.mkdir(parents=True)
    cats = sorted((images / "cat").iterdir())
    for source in cats[:4]:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "late.jpg").write_bytes(b"not yet an image")
    out = tmp_path / "out.csv"
    code, _, err = run(capsys, tmp_path / "mixed", "--server", server, "--model", "tiny", "-o", out, "--top-k", "2")
    assert code == 1 and summary_of(err)["failed"] == 1
    (folder / "late.jpg").write_bytes(cats[4].read_bytes())  # the file is fixed; the rerun retries it
    args = ["--server", server, "--model", "tiny", "-o", out, "--top-k", "2", "--resume"]
    code, _, err = run(capsys, tmp_path / "mixed", *args)
    rows = list(csv.DictReader(out.open()))
    assert code == 0 and len(rows) == 5 and len({r["path"] for r in rows}) == 5 and not any(r["error"] for r in rows)
    summary = summary_of(err)
    assert summary["skipped"] == 4 and summary["classified"] == 5 and summary["failed"] == 0


def test_resume_refuses_another_format_or_top_k_and_leaves_the_file(server, images, tmp_path, capsys):
    out = tmp_path / "out.csv"
    assert run(capsys, images / "cat", "--server", server, "--model", "tiny", "-o", out)[0] == 0
    before = out.read_text()
    code, _, err = run(
        capsys, images / "cat", "--server", server, "--model", "tiny", "-o", out, "--resume", "--top-k", "3"
    )
    assert code == 2 and "--top-k 3" in one_error_line(err) and out.read_text() == before
    code, _, err = run(capsys, images / "cat", "--server", server, "-o", out, "--resume", "--format", "jsonl")
    assert code == 2 and "is not JSON" in one_error_line(err) and out.read_text() == before


def test_the_output_format_follows_the_extension_unless_given(server, images, tmp_path, capsys):
    cats = images / "cat"
    for name, given, check in (
        ("out.csv", [], lambda text: text.startswith("path,label1,score1,true_label")),
        ("out.jsonl", [], lambda text: json.loads(text.splitlines()[0])["predictions"]),
        ("out.txt", [], lambda text: text.split()[:2] == ["path", "prediction"]),
        ("other.csv", ["--format", "jsonl"], lambda text: json.loads(text.splitlines()[0])["predictions"]),
    ):
        assert run(capsys, cats, "--server", server, "--model", "tiny", "-o", tmp_path / name, *given)[0] == 0
        assert check((tmp_path / name).read_text()), name


def test_a_bad_file_fails_alone_with_exit_code_1(server, images, tmp_path, capsys):
    folder = tmp_path / "mixed" / "cat"
    folder.mkdir(parents=True)
    for source in sorted((images / "cat").iterdir())[:5]:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    code, out, err = run(capsys, tmp_path / "mixed", "--server", server, "--model", "tiny", "--format", "table")
    assert code == 1
    assert "FAILED" in err and "broken.jpg" in err and "not in a known image format" in err
    assert summary_of(err)["classified"] == 5
    assert out.count("\n") == 7  # header + 6 rows: the failure is listed in the output too


def test_draws_reach_the_server(server, images, capsys):
    code, _, err = run(capsys, images / "cat", "--server", server, "--model", "tiny", "--draws", "4")
    assert code == 0 and summary_of(err)["classified"] == 10


@pytest.mark.parametrize(
    "options,message",
    [
        (["--model", "absent"], "serves no model 'absent'; it serves: tiny, tiny_uint8"),
        ([], "serves 2 models (tiny, tiny_uint8): choose one with --model"),
        (["--model", "tiny", "--top-k", "11"], "--top-k 11: model tiny has 10 classes"),
        (["--model", "tiny", "--draws", "17"], "--draws 17: 127.0.0.1"),
    ],
)
def test_what_the_server_cannot_serve_fails_once_up_front(server, images, tmp_path, capsys, options, message):
    code, _, err = run(capsys, images / "cat", "--server", server, *options, "-o", tmp_path / "out.csv")
    assert code == 2 and message in one_error_line(err) and not (tmp_path / "out.csv").exists()


def test_without_model_the_servers_only_model_is_used(one_model_server, images, capsys):
    code, out, _ = run(capsys, images / "cat", "--server", one_model_server, "--format", "csv")
    assert code == 0 and len(list(csv.DictReader(io.StringIO(out)))) == 10


@pytest.mark.parametrize(
    "option,value",
    [
        ("--batch-size", "0"),
        ("--concurrency", "0"),
        ("--top-k", "0"),
        ("--draws", "0"),
        ("--timeout", "0"),
        ("--retries", "-1"),
    ],
)
def test_bad_values_are_one_line_usage_errors(images, capsys, option, value):
    code, _, err = run(capsys, images / "cat", option, value)
    assert code == 2 and option in one_error_line(err)


def test_usage_errors_exit_2(server, tmp_path, capsys):
    code, _, err = run(capsys, tmp_path / "nothing-here", "--server", server)
    assert code == 2 and "no such file, folder or glob match" in one_error_line(err)


def test_help_shows_every_default(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for default in ("localhost:8001", "the server's only model", "table", "(default: 32)", "(default: 4)", "60.0"):
        assert default in out
    assert "(default: 5)" in out and "(default: 1)" in out  # retries; top-k and draws


def test_list_file_and_glob_inputs(server, images, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted((images / "dog").iterdir())[:3]) + "\n")
    code, out, _ = run(
        capsys, f"@{listing}", str(images / "frog" / "*.jpg"), "--server", server, "--model", "tiny", "--format", "csv"
    )
    assert code == 0 and len(list(csv.DictReader(io.StringIO(out)))) == 3 + 10


class FlakyService(KServeService):
    """The real KServe service, answering `refusal` to the first two inference calls (UNAVAILABLE: a restarting
    pod; RESOURCE_EXHAUSTED: a full queue)."""

    refusal = grpc.StatusCode.UNAVAILABLE

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.calls = 0
        real = self.ModelInfer

        async def flaky(request, context):
            self.calls += 1
            if self.calls <= 2:
                await context.abort(self.refusal, "try again later")
            return await real(request, context)

        self.ModelInfer = flaky


class OverloadedService(FlakyService):
    refusal = grpc.StatusCode.RESOURCE_EXHAUSTED


@contextlib.contextmanager
def serving(
    service_class: type[KServeService], repository: Path, models: tuple[str, ...] = ("tiny",)
) -> Iterator[tuple[str, KServeService]]:
    """A real grpc.aio server on a free port, on its own event loop (as atop-serve runs it), running
    `service_class` over a real core serving `models`."""
    core = InferenceCore(CoreConfig(repository, models=models))
    core.start()
    service = service_class(core, Metrics(), 64)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result()
    try:
        yield f"127.0.0.1:{port}", service
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        core.close()


@pytest.mark.parametrize("service_class", [FlakyService, OverloadedService], ids=lambda c: c.refusal.name)
def test_client_retries_unavailable_and_resource_exhausted_then_succeeds(echo_repository, images, service_class):
    with serving(service_class, echo_repository, ("echo",)) as (address, service):
        image = next((images / "cat").iterdir()).read_bytes()
        with AtopClient(address, ClientConfig(backoff_base=0.01)) as client:
            assert len(client.classify([image], "echo", top_k=2)[0]) == 2
        assert service.calls == 3
        with AtopClient(address, ClientConfig(retries=1, backoff_base=0.01)) as client:
            service.calls = 0
            with pytest.raises(grpc.RpcError) as error:
                client.classify([image], "echo")
            assert error.value.code() == service.refusal and service.calls == 2


class PlainKServeService(KServeService):
    """The real KServe service declaring only the graph's own input in ModelMetadata, as stock Triton serving
    the exported ONNX does (no BYTES input): clients must decode and send pixels. Records what arrives."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.received: list[str] = []
        metadata, infer = self.ModelMetadata, self.ModelInfer

        async def own_input_only(request, context):
            response = await metadata(request, context)
            del response.inputs[1:]
            return response

        async def recorded(request, context):
            self.received.append(request.inputs[0].datatype)
            return await infer(request, context)

        self.ModelMetadata, self.ModelInfer = own_input_only, recorded


@pytest.mark.parametrize("model,datatype", [("echo", "FP32"), ("echo_uint8", "UINT8")])
def test_the_client_decodes_for_servers_that_take_pixels_only(echo_repository, images, model, datatype):
    files = sorted((images / "ship").iterdir())[:3]
    with serving(PlainKServeService, echo_repository, (model,)) as (address, service), AtopClient(address) as client:
        predictions = client.classify([f.read_bytes() for f in files], model, top_k=3)
    assert service.received == [datatype]
    for path, ranked in zip(files, predictions, strict=True):
        with Image.open(path) as image:  # CIFAR-10 JPEGs are 32x32 already: no resizing to agree on
            pixels = np.asarray(image.convert("RGB"), np.float32)[None].transpose(0, 3, 1, 2) / 255
        expected = expected_probabilities(pixels)[0]
        assert [p.label for p in ranked] == [LABELS[i] for i in np.argsort(-expected, kind="stable")]
        np.testing.assert_allclose([p.score for p in ranked], np.sort(expected)[::-1], atol=2e-6)


class SlowService(KServeService):
    """The real KServe service, a quarter of a second slower per inference (a busy server): time to press Ctrl-C."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        real = self.ModelInfer

        async def slow(request, context):
            await asyncio.sleep(0.25)
            return await real(request, context)

        self.ModelInfer = slow


def test_ctrl_c_stops_cleanly_keeps_the_rows_and_says_how_to_resume(tiny_repository, server, images, tmp_path, capsys):
    out = tmp_path / "out.csv"
    with serving(SlowService, tiny_repository) as (address, _):
        args = [str(images), "--server", address, "--batch-size", "1", "--concurrency", "1", "-o", str(out)]
        # A shell starts a foreground program with Ctrl-C at its default action, but a job launched in the
        # background of a non-interactive shell (as some CI runners do) inherits SIGINT ignored, and Python then
        # never raises KeyboardInterrupt: the client is started as from a terminal, whatever launched the tests.
        as_from_a_terminal = "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        as_from_a_terminal += "runpy.run_module('atop_clients.cli', run_name='__main__')"
        process = subprocess.Popen(
            [sys.executable, "-c", as_from_a_terminal, *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        while process.poll() is None and len(out.read_text().splitlines() if out.exists() else []) < 4:
            threading.Event().wait(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err, err
    assert f"to continue: atop-classify {' '.join(args)} --resume" in err
    rows = list(csv.DictReader(out.open()))
    assert 3 <= len(rows) < 100 and all(r["label1"] and r["score1"] for r in rows)  # whole rows only
    code, _, err = run(capsys, images, "--server", server, "--model", "tiny", "-o", out, "--resume")
    assert code == 0 and summary_of(err)["skipped"] == len(rows)
    assert len({r["path"] for r in csv.DictReader(out.open())}) == 100


def test_async_client(server, images):
    data = [p.read_bytes() for p in sorted((images / "ship").iterdir())[:4]]

    async def go():
        async with AsyncAtopClient(server) as client:
            assert await client.ready()
            return await asyncio.gather(*(client.classify([d], "tiny", top_k=2) for d in data))

    results = asyncio.run(go())
    assert [len(r[0]) for r in results] == [2, 2, 2, 2]
