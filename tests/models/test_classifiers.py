import pytest
import torch
from safetensors.torch import load_file

from atop_models import checkpoint
from atop_models.classifiers import CLASSIFIERS


@pytest.mark.parametrize("name", ["airbench", "resnet18"])
def test_classifier_interface(name):
    model = CLASSIFIERS.create(name, num_classes=7).eval()
    x = torch.rand(3, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (3, model.num_features)
    assert torch.equal(model.forward_head(features), model(x))
    assert model(x).shape == (3, 7)


@pytest.mark.parametrize("name", ["airbench", "resnet18"])
def test_classifier_owns_its_normalization(name):
    model = CLASSIFIERS.create(name, num_classes=10)
    normalized = model.normalize(torch.full((1, 3, 2, 2), 0.5))
    expected = (0.5 - model.normalize.mean) / model.normalize.std
    assert torch.allclose(normalized, expected.expand_as(normalized))
    assert any(name.startswith("normalize.") for name in model.state_dict())  # saved with the weights


def test_parameter_counts():
    count = {n: sum(p.numel() for p in CLASSIFIERS.create(n).parameters()) for n in ("resnet18", "airbench")}
    assert count["resnet18"] == pytest.approx(11.17e6, rel=0.01)
    assert count["airbench"] == pytest.approx(1.97e6, rel=0.02)


def test_whitening_init_decorrelates_patches():
    model = CLASSIFIERS.create("airbench")
    images = torch.rand(200, 3, 32, 32) * 0.3 + torch.rand(200, 3, 1, 1) * 0.7  # strongly correlated pixels
    model.init_whitening(images)
    out = model.whiten(model.normalize(images))[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = torch.cov(out.T)
    assert torch.allclose(covariance, torch.eye(12), atol=0.05)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown classifier 'vgg'; known: airbench, ensemble, mixture, resnet18"):
        CLASSIFIERS.create("vgg")


def test_flip_average_is_mirror_invariant_in_eval_only():
    model = CLASSIFIERS.create("airbench", flip_average=True).eval()
    plain = CLASSIFIERS.create("airbench").eval()
    plain.load_state_dict(model.state_dict())
    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(model(x), model(x.flip(3)), atol=1e-5)
    assert torch.allclose(model(x), (plain(x) + plain(x.flip(3))) / 2, atol=1e-5)
    model.train()
    assert torch.allclose(model(x), plain.train()(x), atol=1e-5)  # training sees each view alone


def test_an_ensemble_serves_the_mean_of_its_members_logits(tmp_path):
    members = [
        {"arch": "airbench", "arch_kwargs": {"widths": [8, 16, 16], "flip_average": True}},
        {"arch": "airbench", "arch_kwargs": {"widths": [16, 16, 32]}},
    ]
    paths = []
    for i, member in enumerate(members):
        torch.manual_seed(i)
        model = CLASSIFIERS.create(member["arch"], num_classes=4, **member["arch_kwargs"])
        model(torch.rand(8, 3, 32, 32))  # BatchNorm statistics off their initial values
        kwargs = {**member["arch_kwargs"], "num_classes": 4}
        meta = {"classes": list("abcd"), "image_size": 32}
        paths.append(checkpoint.save_model(tmp_path / f"m{i}", model, "classifier", "airbench", kwargs, **meta))
    checkpoint.main(["ensemble", str(tmp_path / "ens"), *(str(p.with_suffix("")) for p in paths)])
    ensemble, record = checkpoint.load_model(tmp_path / "ens", "classifier")
    trained = [checkpoint.load_model(p, "classifier")[0].eval() for p in paths]
    assert record["arch"] == "ensemble" and [m["weights_sha256"] for m in record["members"]] == [
        checkpoint.read_config(p)["weights_sha256"] for p in paths
    ]
    x = torch.rand(5, 3, 32, 32)
    ensemble.eval()
    with torch.no_grad():
        expected = (trained[0](x) + trained[1](x)) / 2  # the first member's mirror averaging included
        assert torch.allclose(ensemble(x), expected, atol=1e-6)
        features = ensemble.forward_features(x)
        assert features.shape == (5, ensemble.num_features) == (5, 16 + 32)
        heads = [m.forward_head(m.forward_features(x)) for m in trained]
        assert torch.allclose(ensemble.forward_head(features), (heads[0] + heads[1]) / 2, atol=1e-6)

    kwargs = {"widths": [8, 8, 8], "num_classes": 3}
    other = CLASSIFIERS.create("airbench", **kwargs)
    meta = {"classes": list("abc"), "image_size": 32}
    odd = checkpoint.save_model(tmp_path / "o", other, "classifier", "airbench", kwargs, **meta)
    with pytest.raises(ValueError, match="the members' classes differ"):
        checkpoint.save_combined(tmp_path / "bad", "ensemble", [paths[0], odd])


def _two_classifiers(tmp_path, widths: tuple[list[int], list[int]]) -> list:
    """Two airbench checkpoints of four classes (the weights files' paths), BatchNorm statistics off their
    initial values."""
    paths = []
    for i, member_widths in enumerate(widths):
        torch.manual_seed(i)
        kwargs = {"widths": member_widths, "num_classes": 4}
        model = CLASSIFIERS.create("airbench", **kwargs)
        model(torch.rand(8, 3, 32, 32))
        meta = {"classes": list("abcd"), "image_size": 32}
        paths.append(checkpoint.save_model(tmp_path / f"m{i}", model, "classifier", "airbench", kwargs, **meta))
    return paths


def test_a_mixture_serves_log_probabilities_of_its_weighted_members(tmp_path):
    paths = _two_classifiers(tmp_path, ([8, 16, 16], [16, 16, 32]))
    stems = [str(p.with_suffix("")) for p in paths]
    checkpoint.main(["mixture", str(tmp_path / "mix"), *stems, "--weight", "0.7", "--sharpness", "3"])
    mixture, record = checkpoint.load_model(tmp_path / "mix", "classifier")
    robust, accurate = (checkpoint.load_model(p, "classifier")[0].eval() for p in paths)
    assert record["arch"] == "mixture" and record["arch_kwargs"]["weight"] == 0.7
    x = torch.rand(5, 3, 32, 32)
    mixture.eval()
    with torch.no_grad():
        probabilities = 0.7 * torch.softmax(3 * robust(x), 1) + 0.3 * torch.softmax(accurate(x), 1)
        assert torch.allclose(mixture(x), probabilities.log(), atol=1e-5)
        assert torch.allclose(mixture.forward_head(mixture.forward_features(x)), mixture(x), atol=1e-5)

    # Whatever the accurate member says moves at most 1 - weight of the probability: where the sharpened robust
    # member gives the right class more than (1 - weight) + weight * (its runner-up), the answer stays right.
    sure = torch.tensor([[4.0, 0.0, 0.0, 0.0]])  # softmax: 0.948 on class 0
    for attacked in (torch.tensor([[-1e4, 1e4, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0, 1e4]])):
        assert mixture.combine([sure / 3, attacked]).argmax(1).item() == 0
    assert mixture.combine([torch.zeros(1, 4), torch.tensor([[0.0, 9.0, 0.0, 0.0]])]).argmax(1).item() == 1
    with pytest.raises(ValueError, match="weight must be in"):
        checkpoint.save_combined(tmp_path / "bad", "mixture", stems, weight=1.0, sharpness=1.0)


def test_a_member_comes_out_of_a_combined_checkpoint_as_it_is_stored(tmp_path):
    paths = _two_classifiers(tmp_path, ([16, 32, 32], [16, 16, 32]))  # 32 x 32 x 3 x 3 convs: int8-sized
    stems = [str(p.with_suffix("")) for p in paths]
    checkpoint.save_combined(tmp_path / "mix", "mixture", stems, weight=0.8, sharpness=1.0)
    checkpoint.main(["member", str(tmp_path / "mix"), "1", str(tmp_path / "accurate")])
    assert checkpoint.sha256_file(tmp_path / "accurate.safetensors") == checkpoint.sha256_file(paths[1])

    checkpoint.store_rounded(tmp_path / "mix", tmp_path / "mix8", "int8")
    checkpoint.save_member(tmp_path / "mix8", 0, tmp_path / "robust8")
    robust, record = checkpoint.load_model(tmp_path / "robust8", "classifier")
    mixture, mixture_record = checkpoint.load_model(tmp_path / "mix8", "classifier")
    assert record["weights_dtype"] == "int8" and record["member_of"]["index"] == 0
    assert record["member_of"]["weights_sha256"] == mixture_record["weights_sha256"]
    stored = load_file(tmp_path / "robust8.safetensors")
    assert any(tensor.dtype == torch.int8 for tensor in stored.values())  # not widened on the way out
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(robust.eval()(x), mixture.eval().robust(x))

    with pytest.raises(ValueError, match="member 2 asked for"):
        checkpoint.save_member(tmp_path / "mix8", 2, tmp_path / "none")
    with pytest.raises(ValueError, match="not an ensemble or a mixture"):
        checkpoint.save_member(paths[0], 0, tmp_path / "none")
