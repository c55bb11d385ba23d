"""atop-export on small random-weight checkpoints: written repository, checks, metadata, loader errors."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import REPO, make_tiny_checkpoints
from safetensors.torch import load_file

from atop_export import checks
from atop_export.cli import main
from atop_export.onnx_build import FOLD_INPUT_LIMIT
from atop_models.checkpoint import int8_weights, store_rounded
from atop_models.defended import load_defended
from atop_models.rt import RTConfig
from atop_server.repository import ModelLoadError, ModelNotFoundError, list_models, load_model

CLASSES = [f"class{i}" for i in range(5)]


def make_checkpoints(
    folder: Path, size: int, output: str = "full", purifier_arch: str = "deepfillv2"
) -> tuple[Path, Path]:
    return make_tiny_checkpoints(folder, size, output, CLASSES, purifier_arch)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export32")
    classifier, purifier = make_checkpoints(folder, 32)
    repository = folder / "repository"
    main(
        [
            "--classifier",
            str(classifier),
            "--purifier",
            str(purifier),
            "--repository",
            str(repository),
            "--precisions",
            "fp32",
            "fp16",
            "--pieces",
            "classifier",
            "purifier",
            "--parity-images",
            "16",
        ]
    )
    return repository, classifier, purifier


def test_repository_layout_and_reports(exported):
    repository, _, _ = exported
    assert list_models(repository) == {
        name: [1]
        for name in (
            "atop_cifar10",
            "atop_cifar10_classifier",
            "atop_cifar10_fp16",
            "atop_cifar10_purifier",
            "atop_cifar10_uint8",
            "atop_cifar10_uint8_fp16",
        )
    }
    config = (repository / "atop_cifar10_uint8" / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in config and "TYPE_UINT8" in config and "dims: [ 32, 32, 3 ]" in config
    assert 'label_filename: "labels.txt"' in config and "max_batch_size: 256" in config
    assert (repository / "atop_cifar10" / "labels.txt").read_text().split() == CLASSES
    readme = (repository / "README.md").read_text()
    assert "atop-export --classifier" in readme and "sha256" in readme
    for name in ("atop_cifar10", "atop_cifar10_uint8_fp16"):  # the exporter's own checks, recorded
        report = json.loads((repository / name / "export_report.json").read_text())
        assert set(report["checks"]) >= {"parity", "rt", "unpredictability"}


FIRST_DRAW = """
import hashlib, sys
from pathlib import Path
import numpy as np
from atop_server.repository import load_model
session = load_model(Path(sys.argv[1]), "atop_cifar10").session
gray = np.full((4, 3, 32, 32), 0.5, np.float32)
print(hashlib.sha256(session.run(["RT_IMAGE"], {"IMAGE": gray})[0].tobytes()).hexdigest())
"""


def holes_per_image(session, size: int, grid: int = 8) -> np.ndarray:
    """Blocks of the grid that the graph's RT_IMAGE shows as holes (all zero), per image of a gray batch of 4:
    noise at sigma 0.25 around 0.5 never zeroes a whole open block."""
    gray = np.full((4, 3, size, size), 0.5, np.float32)
    (rt,) = session.run(["RT_IMAGE"], {"IMAGE": gray})
    block = size // grid
    return (rt.reshape(4, 3, grid, block, grid, block) == 0).all(axis=(1, 3, 5)).sum(axis=(1, 2))


def test_the_graph_masks_exactly_its_blocks_and_no_session_repeats_another(exported):
    """Read from the graph's own RT_IMAGE, not from the exporter's report: 16 of the 8 x 8 blocks (4 x 4 pixels)
    are holes in every image, in different places, and fresh sessions (in this process or another) draw
    differently, so an attacker who knows the model cannot replay its randomness."""
    repository, _, _ = exported
    sessions = [load_model(repository, "atop_cifar10").session for _ in range(2)]
    assert holes_per_image(sessions[0], 32).tolist() == [16] * 4
    gray = np.full((4, 3, 32, 32), 0.5, np.float32)
    draws = [session.run(["RT_IMAGE"], {"IMAGE": gray})[0] for session in sessions]
    assert len({(draws[0][i] == 0).tobytes() for i in range(4)}) == 4  # holes in different places per image
    other = subprocess.run(
        [sys.executable, "-c", FIRST_DRAW, str(repository)], capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()
    digests = {hashlib.sha256(draw.tobytes()).hexdigest() for draw in draws} | {other}
    assert len(digests) == 3


def test_metadata_is_read_back_by_the_server_loader(exported):
    repository, classifier, _ = exported
    model = load_model(repository, "atop_cifar10")
    assert model.labels == CLASSES
    assert model.input_spec == {
        "name": "IMAGE",
        "layout": "NCHW",
        "dtype": "float32",
        "height": 32,
        "width": 32,
        "channels": "RGB",
        "value_range": [0.0, 1.0],
    }
    assert model.metadata["atop.rt"] == {"noise_sigma": 0.25, "grid": 8, "mask_fraction": 0.25}
    sha = json.loads(Path(str(classifier) + ".json").read_text())["weights_sha256"]
    assert model.metadata["atop.checkpoints"]["classifier"]["sha256"] == sha
    assert model.inputs[0].shape[0] == "batch" and model.outputs[0].shape == ("batch", len(CLASSES))
    # What the defense did, for requests that ask: the RT draw and the purified image (outputs.py in the server).
    assert [(o.name, o.shape) for o in model.outputs[1:]] == [
        ("RT_IMAGE", ("batch", 3, 32, 32)),
        ("PURIFIED", ("batch", 3, 32, 32)),
    ]


def test_no_model_carries_records_of_the_machine_it_was_built_on(exported):
    """PyTorch's exporter notes on every node the stack trace (with this machine's source paths), the module and
    the FX node it came from; the shipped files keep none of it."""
    repository, _, _ = exported
    for path in repository.glob("*/1/model.onnx"):
        nodes = onnx.load(str(path)).graph.node
        assert nodes and not any(node.metadata_props or node.doc_string for node in nodes), path
        assert str(REPO).encode() not in path.read_bytes(), path


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_dynamic_batch_and_randomized_outputs(exported, batch):
    repository, _, _ = exported
    session = load_model(repository, "atop_cifar10_uint8").session
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    first, second = (session.run(None, {"IMAGE": images})[0] for _ in range(2))
    assert first.shape == (batch, 5) and np.allclose(first.sum(1), 1, atol=1e-5)
    assert not np.array_equal(first, second)  # RT drawn anew on every run


def test_pieces_match_pytorch(exported):
    repository, classifier, purifier = exported
    pipeline = load_defended(classifier, purifier).pipeline.eval()
    images = torch.rand(4, 3, 32, 32)
    probabilities = load_model(repository, "atop_cifar10_classifier").session.run(None, {"IMAGE": images.numpy()})[0]
    with torch.no_grad():
        expected = torch.softmax(pipeline.classifier(images), 1).numpy()
    assert np.abs(probabilities - expected).max() < 1e-4


def test_the_server_core_serves_every_classifier_and_skips_the_purifier_piece(exported):
    from atop_server.core import CoreConfig, InferenceCore

    repository, _, _ = exported
    core = InferenceCore(CoreConfig(repository))
    core.load()
    assert sorted(core.models) == [
        "atop_cifar10",
        "atop_cifar10_classifier",
        "atop_cifar10_fp16",
        "atop_cifar10_uint8",
        "atop_cifar10_uint8_fp16",
    ]
    core.warmup()
    with pytest.raises(ModelLoadError, match="purifier piece"):
        InferenceCore(CoreConfig(repository, models=("atop_cifar10_purifier",))).load()


def test_checks_fail_on_a_wrong_graph(exported, tmp_path):
    repository, classifier, purifier = exported
    path = repository / "atop_cifar10" / "1" / "model.onnx"
    pipeline = load_defended(classifier, purifier).pipeline.eval()
    with torch.no_grad():
        pipeline.classifier.head.weight.mul_(-1)  # PyTorch now disagrees with the exported graph
    with pytest.raises(checks.ExportCheckError, match="differ from PyTorch"):
        checks.defended_parity(path, pipeline, torch.rand(8, 3, 32, 32), 1e-4, ["CPUExecutionProvider"])
    with pytest.raises(checks.ExportCheckError, match="masked blocks per image"):
        checks.rt_statistics(path, RTConfig(mask_fraction=0.5), "float", 32, ["CPUExecutionProvider"])
    with pytest.raises(checks.ExportCheckError, match="noise std"):
        checks.rt_statistics(path, RTConfig(noise_sigma=0.1), "float", 32, ["CPUExecutionProvider"])


def test_loader_reports_broken_models_clearly(exported, tmp_path):
    repository, _, _ = exported
    original = (repository / "atop_cifar10" / "1" / "model.onnx").read_bytes()
    broken = tmp_path / "repository"
    for name, data in (("truncated", original[: len(original) // 2]), ("garbage", b"\x00not onnx" * 100)):
        (broken / name / "1").mkdir(parents=True)
        (broken / name / "1" / "model.onnx").write_bytes(data)
        with pytest.raises(ModelLoadError, match=rf"{name}/1/model.onnx is not a loadable ONNX model"):
            load_model(broken, name)
    bare = onnx.load_from_string(original)
    del bare.metadata_props[:]
    (broken / "bare" / "1").mkdir(parents=True)
    onnx.save(bare, str(broken / "bare" / "1" / "model.onnx"))
    with pytest.raises(ModelLoadError, match="lacks the metadata"):
        load_model(broken, "bare")
    with pytest.raises(ModelNotFoundError, match="no model 'absent'"):
        load_model(broken, "absent")
    with pytest.raises(ModelNotFoundError, match="has no version 3"):
        load_model(repository, "atop_cifar10", version=3)


def test_export_at_256px_with_composite_output(tmp_path):
    classifier, purifier = make_checkpoints(tmp_path, 256, output="composite")
    main(
        [
            "--classifier",
            str(classifier),
            "--purifier",
            str(purifier),
            "--repository",
            str(tmp_path / "r"),
            "--inputs",
            "float",
            "--parity-images",
            "4",
            "--name",
            "big",
        ]
    )
    model = load_model(tmp_path / "r", "big")
    assert holes_per_image(model.session, 256).tolist() == [16] * 4  # 32 x 32-pixel blocks at 256 px
    assert model.metadata["atop.pipeline"]["output"] == "composite" and model.input_spec["height"] == 256


def test_cli_refuses_missing_checkpoints(tmp_path, capsys):
    missing = tmp_path / "none"
    with pytest.raises(SystemExit) as exit_info:
        main(["--classifier", str(missing), "--purifier", str(missing), "--repository", str(tmp_path / "r")])
    assert exit_info.value.code == 2  # a usage error, before anything is written
    assert capsys.readouterr().err.strip().endswith(f"atop-export: error: checkpoint {missing} not found")
    assert not (tmp_path / "r").exists()


def test_a_unet_purifier_exports_and_serves(tmp_path):
    classifier, purifier = make_checkpoints(tmp_path, 32, purifier_arch="unet")
    repository = tmp_path / "repository"
    main(["--classifier", str(classifier), "--purifier", str(purifier), "--repository", str(repository)])
    # The exporter raises when parity with torch fails; here the server's loader opens and runs the result.
    model = load_model(repository, "atop_cifar10")
    assert model.metadata["atop.checkpoints"]["purifier"]["arch"] == "unet"
    images = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    probabilities = model.session.run(None, {"IMAGE": images})[0]
    assert probabilities.shape == (3, len(CLASSES)) and np.allclose(probabilities.sum(1), 1.0, atol=1e-5)


def initializer_bytes(graph: onnx.GraphProto) -> int:
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in graph.initializer)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("part", ["classifier", "purifier"])
def test_a_part_stored_in_fewer_bytes_keeps_its_weights_so_in_the_served_graph(tmp_path, part, dtype):
    checkpoints = dict(zip(("classifier", "purifier"), make_checkpoints(tmp_path, 32), strict=True))
    rounded_path = tmp_path / f"{part}-{dtype}"
    store_rounded(checkpoints[part], rounded_path, dtype)
    graphs = {}
    for name, weights in (("fp32", checkpoints), ("rounded", checkpoints | {part: rounded_path})):
        repository = tmp_path / name
        # atop-export's own checks compare the graph with the PyTorch pipeline built from the same checkpoints
        main(
            [
                "--classifier",
                str(weights["classifier"]),
                "--purifier",
                str(weights["purifier"]),
                "--repository",
                str(repository),
            ]
        )
        graphs[name] = onnx.load(str(repository / "atop_cifar10" / "1" / "model.onnx")).graph
    rounded = getattr(load_defended(**(checkpoints | {part: rounded_path})), part).model.state_dict()
    expected = {
        name: tensor
        for name, tensor in rounded.items()
        if name.endswith("weight") and tensor.dim() in (2, 4) and tensor.numel() >= FOLD_INPUT_LIMIT
    }
    stored = int8_weights(load_file(str(rounded_path) + ".safetensors"))
    prefix = f"core/pipeline.{part}."
    onnx_dtype = onnx.TensorProto.FLOAT16 if dtype == "float16" else onnx.TensorProto.INT8
    kept = {i.name.removeprefix(prefix).removesuffix("_stored"): i for i in graphs["rounded"].initializer}
    kept = {name: i for name, i in kept.items() if i.data_type == onnx_dtype}
    # every conv and linear weight the optimizer would not fold back, stored exactly as the checkpoint holds it
    # and not folded with a BatchNorm; nothing of the other part is
    assert sorted(kept) == sorted(expected)
    for name, initializer in kept.items():
        weight = expected[name].half().numpy() if dtype == "float16" else stored[name][0].numpy()
        assert np.array_equal(onnx.numpy_helper.to_array(initializer), weight), name
    saved = sum(tensor.numel() * (2 if dtype == "float16" else 3) for tensor in expected.values())
    # int8: the per-channel scales come in (the optimizer shares equal ones between layers)
    scales = sum(onnx.numpy_helper.to_array(i).nbytes for i in graphs["rounded"].initializer if "_scale" in i.name)
    assert (scales > 0) == (dtype == "int8")
    assert expected and initializer_bytes(graphs["fp32"]) - initializer_bytes(graphs["rounded"]) == saved - scales
