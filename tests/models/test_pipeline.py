import pytest
import torch
import torch.nn.functional as F

from atop_models.classifiers import CLASSIFIERS
from atop_models.pipeline import DefendedClassifier, PipelineConfig
from atop_models.purifiers import PURIFIERS
from atop_models.rt import RandomTransform, RTConfig


def make_pipeline(**config):
    torch.manual_seed(0)
    purifier = PURIFIERS.create("deepfillv2", cnum=8)
    classifier = CLASSIFIERS.create("airbench", num_classes=10, widths=(16, 32, 32)).eval()
    return DefendedClassifier(RandomTransform(RTConfig()), purifier, classifier, PipelineConfig(**config))


def test_ce_gradient_reaches_the_purifier_and_the_input():
    pipeline = make_pipeline()
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    F.cross_entropy(pipeline(x), torch.tensor([0, 1, 2, 3])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in pipeline.purifier.named_parameters():
        assert p.grad is not None, name
    assert sum(p.grad.abs().sum() for p in pipeline.purifier.parameters()) > 0
    assert pipeline.purifier.refine.decoder[-2].conv.weight.grad.abs().sum() > 0


def test_composite_keeps_known_pixels_and_full_replaces_them():
    x = torch.rand(2, 3, 32, 32)
    composite = make_pipeline(output="composite")
    x_rt, mask = composite.rt(x, torch.Generator().manual_seed(3))
    out = composite.purify(x, torch.Generator().manual_seed(3))
    assert torch.allclose(out * (1 - mask), x_rt * (1 - mask))
    full = make_pipeline(output="full").purify(x, torch.Generator().manual_seed(3))
    refined = composite.purifier(x_rt, mask)[1]
    assert torch.allclose(full, refined)


def test_draws_average_probabilities():
    pipeline = make_pipeline(draws=4)
    x = torch.rand(3, 3, 32, 32)
    out = pipeline(x, torch.Generator().manual_seed(0))
    assert out.shape == (3, 10)
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)
    single = make_pipeline(draws=1)
    generator = torch.Generator().manual_seed(0)
    repeated = x.repeat(4, 1, 1, 1)  # the same draws as the K=4 pass, one image per draw
    probs = F.softmax(single(repeated, generator), dim=1).view(4, 3, 10).mean(0)
    assert torch.allclose(out.exp(), probs, atol=1e-5)


def test_pipeline_is_randomized_per_call():
    pipeline = make_pipeline()
    x = torch.rand(2, 3, 32, 32)
    assert not torch.equal(pipeline.purify(x), pipeline.purify(x))


def test_bad_pipeline_config_is_refused():
    with pytest.raises(ValueError, match="output"):
        PipelineConfig(output="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="draws"):
        PipelineConfig(draws=0)
