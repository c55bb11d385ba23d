import json

import pytest
import safetensors.torch
import torch

from atop_models import checkpoint
from atop_models.classifiers import CLASSIFIERS
from atop_models.purifiers import PURIFIERS


def test_model_round_trip_rebuilds_the_same_network(tmp_path):
    model = PURIFIERS.create("deepfillv2", cnum=8, dilations=[2, 4])
    checkpoint.save_model(
        tmp_path / "p", model, "purifier", "deepfillv2", {"cnum": 8, "dilations": [2, 4]}, image_size=32
    )
    loaded, record = checkpoint.load_model(tmp_path / "p", "purifier")
    assert record["image_size"] == 32 and len(record["weights_sha256"]) == 64
    x, mask = torch.rand(2, 3, 32, 32), torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:16] = 1
    for a, b in zip(model(x, mask), loaded(x, mask), strict=True):
        assert torch.equal(a, b)
    assert not (tmp_path / "p.safetensors.tmp").exists()


def test_corrupted_or_wrong_kind_checkpoints_are_refused(tmp_path):
    model = CLASSIFIERS.create("airbench", widths=(8, 8, 8))
    weights = checkpoint.save_model(tmp_path / "c", model, "classifier", "airbench", {"widths": [8, 8, 8]})
    with pytest.raises(ValueError, match="holds a classifier, not a purifier"):
        checkpoint.load_model(tmp_path / "c", "purifier")
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted or replaced"):
        checkpoint.load_model(tmp_path / "c.json", "classifier")
    (tmp_path / "x.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an atop-checkpoint"):
        checkpoint.read_config(tmp_path / "x")


def test_a_checkpoint_stored_in_fp16_loads_the_rounded_weights_at_half_the_bytes(tmp_path, capsys):
    model = CLASSIFIERS.create("airbench", widths=(16, 32, 32))
    model(torch.rand(8, 3, 32, 32))  # BatchNorm statistics and its batch counter move off their initial values
    source = checkpoint.save_model(tmp_path / "c", model, "classifier", "airbench", {"widths": [16, 32, 32]}, seed=3)
    checkpoint.main(["half", str(tmp_path / "c"), str(tmp_path / "half")])
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'half.safetensors'}: ")
    loaded, record = checkpoint.load_model(tmp_path / "half", "classifier")  # its own sha256 checked
    assert record["weights_dtype"] == "float16" and record["seed"] == 3
    assert record["rounded_from"] == checkpoint.read_config(tmp_path / "c")["weights_sha256"]
    assert (tmp_path / "half.safetensors").stat().st_size < 0.55 * source.stat().st_size
    for name, value in model.state_dict().items():
        kept = loaded.state_dict()[name]
        assert kept.dtype == value.dtype  # the model computes as before, in its own dtypes
        expected = value.half().float() if value.is_floating_point() else value  # integers are not rounded
        assert torch.equal(kept, expected), name
    assert not torch.equal(loaded.state_dict()["head.weight"], model.state_dict()["head.weight"])


def test_a_checkpoint_stored_in_int8_loads_per_channel_rounded_weights_at_a_quarter_of_the_bytes(tmp_path):
    model = CLASSIFIERS.create("airbench", widths=(16, 32, 64))
    model(torch.rand(8, 3, 32, 32))
    source = checkpoint.save_model(tmp_path / "c", model, "classifier", "airbench", {"widths": [16, 32, 64]})
    checkpoint.main(["int8", str(tmp_path / "c"), str(tmp_path / "q")])
    loaded, record = checkpoint.load_model(tmp_path / "q", "classifier")
    assert (
        record["weights_dtype"] == "int8" and record["rounded_from"] == checkpoint.read_config(source)["weights_sha256"]
    )
    stored = safetensors.torch.load_file(str(tmp_path / "q.safetensors"))
    quantized = checkpoint.int8_weights(stored)
    large = {
        f"{name}.weight"
        for name, layer in model.named_modules()
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)) and layer.weight.numel() >= checkpoint.INT8_MIN_VALUES
    }
    assert set(quantized) == large and len(large) >= 3
    assert (tmp_path / "q.safetensors").stat().st_size < 0.35 * source.stat().st_size
    for name, value in model.state_dict().items():
        kept = loaded.state_dict()[name]
        assert kept.dtype == value.dtype, name
        if name in large:
            q, scale = quantized[name]
            assert q.dtype == torch.int8 and q.abs().flatten(1).amax(1).eq(127).all(), (
                name
            )  # every channel's range used
            step = scale.view(-1, *[1] * (value.dim() - 1))
            assert torch.equal(kept, q.float() * step) and (kept - value).abs().le(step / 2 + 1e-7).all(), name
        else:
            assert torch.equal(kept, value.half().float() if value.is_floating_point() else value), name
    with pytest.raises(ValueError, match="dtype must be"):
        checkpoint.store_rounded(source, tmp_path / "x", "int4")  # type: ignore[arg-type]


def test_training_state_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.rand(4, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / "state.safetensors"
    checkpoint.save_state(path, {"opt": optimizer.state_dict(), "epoch": 3, "sums": {"loss": 1.5}, "none": None})
    state = checkpoint.load_state(path)
    assert state["epoch"] == 3 and state["sums"] == {"loss": 1.5} and state["none"] is None
    restored = torch.optim.Adam(model.parameters(), lr=0.5)
    restored.load_state_dict(state["opt"])
    assert restored.param_groups[0]["lr"] == 0.01
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert b"pickle" not in path.read_bytes()[:200]
