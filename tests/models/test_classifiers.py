import pytest
import torch

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
    count = {n: sum(p.numel() for p in CLASSIFIERS.create(n).parameters()) for n in CLASSIFIERS.names()}
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
    with pytest.raises(KeyError, match="unknown classifier 'vgg'; known: airbench, resnet18"):
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
