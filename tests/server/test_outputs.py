"""The optional outputs of the shipped model (RT'd image, purified image, stability over the draws) over gRPC,
HTTP and the Python client, from a real server; requests that do not ask for them get the probabilities alone,
also while they share executions with requests that do."""

import asyncio
import base64
import io
import json
import urllib.request

import grpc
import numpy as np
import pytest
from PIL import Image

from atop_clients import AtopClient, ClientConfig, Prediction, Purified
from atop_proto import grpc_service_pb2 as pb
from atop_proto import grpc_service_pb2_grpc as pb_grpc
from atop_server.app import Server, ServerConfig
from atop_server.batcher import BatcherConfig
from atop_server.cli import DEFAULT_REPOSITORY
from atop_server.core import Call, CoreConfig
from atop_server.http import HttpConfig

MODEL = "atop_cifar10"


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server():
    core = CoreConfig(DEFAULT_REPOSITORY, max_draws=8, batcher=BatcherConfig(max_batch_size=8))
    running = Server(ServerConfig(core=core, port=0, metrics_port=-1, grace_seconds=5, http=HttpConfig(0)))
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def infer(stub, images: list[bytes], outputs: list[str], draws: int = 1) -> dict[str, np.ndarray]:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.parameters["draws"].int64_param = draws
    request.inputs.add(name="IMAGE_BYTES", datatype="BYTES", shape=[len(images), 1])
    request.raw_input_contents.append(b"".join(len(x).to_bytes(4, "little") + x for x in images))
    for name in outputs:
        request.outputs.add(name=name)
    response = stub.ModelInfer(request, timeout=120)
    return {
        o.name: np.frombuffer(raw, "<f4").reshape(list(o.shape))
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def test_metadata_lists_the_optional_outputs(stub):
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=60)
    assert [(o.name, list(o.shape)) for o in metadata.outputs] == [
        ("PROBABILITIES", [-1, 10]),
        ("RT_IMAGE", [-1, 3, 32, 32]),
        ("PURIFIED", [-1, 3, 32, 32]),
        ("STABILITY", [-1]),
    ]


def test_grpc_returns_the_rt_and_purified_images_and_the_stability(server, stub):
    metadata = server.core.model(MODEL).loaded.metadata  # what the shipped graph was exported with
    rt, output = metadata["atop.rt"], metadata["atop.pipeline"]["output"]
    images = [png(i) for i in range(3)]
    out = infer(stub, images, ["PROBABILITIES", "RT_IMAGE", "PURIFIED", "STABILITY"], draws=4)
    assert out["PROBABILITIES"].shape == (3, 10) and out["STABILITY"].shape == (3,)
    assert set(out["STABILITY"].tolist()) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(x))) for x in images]).transpose(0, 3, 1, 2) / 255
    for name in ("RT_IMAGE", "PURIFIED"):
        assert out[name].shape == (3, 3, 32, 32) and out[name].min() >= 0 and out[name].max() <= 1
    # RT blanks its share of the blocks (zeros) and noises the rest; the purifier fills the holes in, and with
    # the composite output leaves the open pixels as RT gave them.
    holes = np.repeat((out["RT_IMAGE"] == 0).all(axis=1, keepdims=True), 3, axis=1)
    assert abs(holes.mean() - rt["mask_fraction"]) < 0.01 and (out["PURIFIED"] == 0).all(axis=1).mean() < 0.01
    noise = np.abs(out["RT_IMAGE"] - pixels)[~holes].mean()
    assert noise > rt["noise_sigma"] / 4 if rt["noise_sigma"] else noise < 1e-6
    assert np.abs(out["PURIFIED"] - out["RT_IMAGE"])[holes].mean() > 0.1
    changed = np.abs(out["PURIFIED"] - out["RT_IMAGE"])[~holes].mean()
    assert changed < 1e-6 if output == "composite" else changed > 0.01
    assert infer(stub, images, ["STABILITY"])["STABILITY"].tolist() == [1.0, 1.0, 1.0]  # one draw agrees with itself


def test_nothing_extra_unless_asked_even_in_shared_batches(server):
    core, model = server.core, server.core.model(MODEL)
    images = np.random.default_rng(0).random((6, 3, 32, 32), dtype=np.float32)

    async def both():
        plain = [core.infer(model, images[:3], 2, Call(client=f"c{i}")) for i in range(4)]
        asked = [core.infer(model, images[3:], 2, Call(client="v"), ("PURIFIED",))]
        return await asyncio.gather(*plain, *asked)

    loop = server._loop  # the server's own loop, as its services run there
    answers = asyncio.run_coroutine_threadsafe(both(), loop).result(120)
    for answer in answers[:-1]:
        assert answer.probabilities.shape == (3, 10) and answer.images == {}
    assert answers[-1].images["PURIFIED"].shape == (3, 3, 32, 32) and model.image_requests == 0


def test_bad_output_requests_are_invalid_argument(stub):
    with pytest.raises(grpc.RpcError, match="has the outputs") as error:
        infer(stub, [png(0)], ["DENOISED"])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="IMAGE_BYTES", datatype="BYTES", shape=[1, 1]).contents.bytes_contents.append(png(0))
    request.outputs.add(name="PURIFIED").parameters["classification"].int64_param = 2
    with pytest.raises(grpc.RpcError, match="classification extension applies to PROBABILITIES"):
        stub.ModelInfer(request, timeout=60)


def test_http_returns_the_optional_outputs_as_json(server):
    body = {
        "parameters": {"draws": 2},
        "inputs": [
            {"name": "IMAGE_BYTES", "shape": [1, 1], "datatype": "BYTES", "data": [base64.b64encode(png(1)).decode()]}
        ],
        "outputs": [{"name": "PURIFIED"}, {"name": "STABILITY"}],
    }
    call = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/v2/models/{MODEL}/infer", json.dumps(body).encode()
    )
    with urllib.request.urlopen(call, timeout=60) as response:
        outputs = {o["name"]: o for o in json.loads(response.read())["outputs"]}
    assert outputs["PURIFIED"]["shape"] == [1, 3, 32, 32] and len(outputs["PURIFIED"]["data"]) == 3072
    assert outputs["STABILITY"]["data"][0] in (0.5, 1.0)


def test_python_client_return_purified(server):
    with AtopClient(f"127.0.0.1:{server.port}", ClientConfig(retries=0)) as client:
        results = client.classify([png(2), png(3)], MODEL, top_k=3, draws=3, return_purified=True)
        plain = client.classify([png(2)], MODEL, top_k=3)
    assert all(isinstance(r, Purified) for r in results) and len(results) == 2
    stability = results[0].stability * 3
    assert len(results[0].predictions) == 3 and stability == pytest.approx(round(stability))
    assert results[0].rt_image.shape == results[0].purified.shape == (3, 32, 32)
    assert len(plain[0]) == 3 and all(isinstance(p, Prediction) for p in plain[0])  # the plain form, unchanged
