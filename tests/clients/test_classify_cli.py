"""atop-classify and the Python clients against a real in-process atop-serve on an ephemeral port."""

import asyncio
import csv
import io
import json
import tarfile
from pathlib import Path

import grpc
import pytest

from atop_clients import AsyncAtopClient, AtopClient, ClientConfig
from atop_clients.cli import main as classify
from atop_proto import grpc_service_pb2_grpc
from atop_server.app import Server, ServerConfig
from atop_server.batcher import BatcherConfig
from atop_server.core import CoreConfig
from atop_server.kserve import KServeService


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
def images(cifar_folder) -> Path:
    """The CIFAR-10 test slice: an ImageFolder of 10 classes x 10 real JPEGs."""
    return cifar_folder / "test"


def run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        classify([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


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
    assert 0 <= summary["accuracy"] <= 1


def test_tar_input_jsonl_and_resume(server, images, tmp_path, capsys):
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(images, arcname="test")
    out = tmp_path / "out.jsonl"
    code, _, _ = run(capsys, archive, "--server", server, "--model", "tiny_uint8", "--format", "jsonl", "-o", out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and len(records) == 100 and records[0]["path"].startswith(f"{archive}!test/")
    assert records[0]["true_label"] in {p.name for p in images.iterdir()} and records[0]["predictions"][0]["label"]

    out.write_text("\n".join(out.read_text().splitlines()[:40]) + "\n")  # as if interrupted after 40
    code, _, err = run(
        capsys, archive, "--server", server, "--model", "tiny", "--format", "jsonl", "-o", out, "--resume"
    )
    summary = json.loads(err.strip().splitlines()[-1])
    assert code == 0 and summary["skipped"] == 40 and summary["classified"] == 60
    assert len({json.loads(line)["path"] for line in out.read_text().splitlines()}) == 100


def test_a_bad_file_fails_alone_with_exit_code_1(server, images, tmp_path, capsys):
    folder = tmp_path / "mixed" / "cat"
    folder.mkdir(parents=True)
    for source in sorted((images / "cat").iterdir())[:5]:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    code, out, err = run(capsys, tmp_path / "mixed", "--server", server, "--model", "tiny", "--format", "table")
    assert code == 1
    assert "FAILED" in err and "broken.jpg" in err and "not in a known image format" in err
    assert json.loads([line for line in err.splitlines() if line.startswith("{")][-1])["classified"] == 5
    assert out.count("\n") == 7  # header + 6 rows: the failure is listed in the output too


def test_draws_reach_the_server_and_are_bounded_there(server, images, capsys):
    cats = images / "cat"
    code, _, err = run(capsys, cats, "--server", server, "--model", "tiny", "--draws", "4", "--format", "jsonl")
    assert code == 0 and json.loads(err.strip().splitlines()[-1])["classified"] == 10
    code, _, err = run(capsys, cats, "--server", server, "--model", "tiny", "--draws", "17", "--format", "jsonl")
    assert code == 1 and "INVALID_ARGUMENT" in err and "draws" in err


def test_usage_errors_exit_2(server, tmp_path, capsys):
    code, _, err = run(capsys, tmp_path / "nothing-here", "--server", server)
    assert code == 2 and "no such file, folder or glob match" in err


def test_list_file_and_glob_inputs(server, images, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in sorted((images / "dog").iterdir())[:3]) + "\n")
    code, out, _ = run(
        capsys, f"@{listing}", str(images / "frog" / "*.jpg"), "--server", server, "--model", "tiny", "--format", "csv"
    )
    assert code == 0 and len(list(csv.DictReader(io.StringIO(out)))) == 3 + 10


class FlakyService(KServeService):
    """The real KServe service, answering UNAVAILABLE to the first two inference calls (a restarting pod)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.calls = 0
        real = self.ModelInfer

        async def flaky(request, context):
            self.calls += 1
            if self.calls <= 2:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
            return await real(request, context)

        self.ModelInfer = flaky


def test_client_retries_unavailable_then_succeeds(tiny_repository, cifar_folder):
    import threading

    from atop_server.core import InferenceCore
    from atop_server.metrics import Metrics

    core = InferenceCore(CoreConfig(tiny_repository, models=("tiny",)))
    core.start()
    service = FlakyService(core, Metrics(), 64)
    loop = asyncio.new_event_loop()  # the server's own loop, as atop-serve runs it
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result()
    try:
        image = next((cifar_folder / "test" / "cat").iterdir()).read_bytes()
        with AtopClient(f"127.0.0.1:{port}", ClientConfig(backoff_base=0.01)) as client:
            assert len(client.classify([image], "tiny", top_k=2)[0]) == 2
        assert service.calls == 3
        with AtopClient(f"127.0.0.1:{port}", ClientConfig(retries=1, backoff_base=0.01)) as client:
            service.calls = 0
            with pytest.raises(grpc.RpcError) as error:
                client.classify([image], "tiny")
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE and service.calls == 2
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        core.close()


def test_async_client(server, images):
    data = [p.read_bytes() for p in sorted((images / "ship").iterdir())[:4]]

    async def go():
        async with AsyncAtopClient(server) as client:
            assert await client.ready()
            return await asyncio.gather(*(client.classify([d], "tiny", top_k=2) for d in data))

    results = asyncio.run(go())
    assert [len(r[0]) for r in results] == [2, 2, 2, 2]
