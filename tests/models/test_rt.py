import pytest
import torch

from atop_models.rt import RT_PRESETS, RandomTransform, RTConfig


def test_exact_masked_fraction_per_image_and_block_aligned():
    rt = RandomTransform(RTConfig(grid=8, mask_fraction=0.25))
    x = torch.rand(500, 3, 32, 32)
    _, mask = rt(x)
    assert mask.shape == (500, 1, 32, 32)
    blocks = mask[:, 0, ::4, ::4]  # one pixel per 4x4 block
    assert torch.equal(blocks.repeat_interleave(4, 1).repeat_interleave(4, 2), mask[:, 0])  # whole blocks only
    assert (blocks.flatten(1).sum(1) == 16).all()  # exactly 16 of 64 blocks in every image


def test_every_block_gets_masked_uniformly():
    rt = RandomTransform(RTConfig(grid=8, mask_fraction=0.25))
    _, mask = rt(torch.rand(4000, 3, 32, 32))
    frequency = mask[:, 0, ::4, ::4].mean(0)
    assert frequency.min() > 0.20 and frequency.max() < 0.30


def test_noise_scale_and_clipping():
    rt = RandomTransform(RTConfig(noise_sigma=0.25, mask_fraction=0.0))
    x = torch.full((200, 3, 32, 32), 0.5)
    noise = rt.draw_noise(x)
    assert abs(noise.std().item() - 0.25) < 0.005 and abs(noise.mean().item()) < 0.005
    x_rt, mask = rt(x)
    assert mask.sum() == 0
    assert x_rt.min() >= 0 and x_rt.max() <= 1
    assert x_rt.min() == 0 and x_rt.max() == 1  # 2 sigma from 0.5: some pixels do clip
    assert 0.2 < (x_rt - x).std() < 0.25  # clipping shrinks the spread a little


def test_masked_pixels_are_zero_and_known_pixels_are_noisy_input():
    rt = RandomTransform(RTConfig(noise_sigma=0.0))
    x = torch.rand(16, 3, 32, 32) * 0.8 + 0.1
    x_rt, mask = rt(x)
    assert torch.equal(x_rt * mask, torch.zeros_like(x_rt))
    assert torch.allclose(x_rt * (1 - mask), x * (1 - mask))


def test_draws_are_independent_per_sample_and_per_call():
    rt = RandomTransform(RTConfig())
    x = torch.full((64, 3, 32, 32), 0.5)
    _, mask_a = rt(x)
    _, mask_b = rt(x)
    assert not torch.equal(mask_a, mask_b)
    assert len({tuple(m.flatten().tolist()) for m in mask_a[:, 0, ::4, ::4]}) == 64  # no two images share a mask
    noise = rt.draw_noise(x).flatten(1)
    correlation = torch.corrcoef(noise[:8])
    assert (correlation - torch.eye(8)).abs().max() < 0.1


def test_generator_makes_draws_reproducible():
    rt = RandomTransform(RTConfig())
    x = torch.rand(8, 3, 32, 32)
    a = rt(x, torch.Generator().manual_seed(7))
    b = rt(x, torch.Generator().manual_seed(7))
    c = rt(x, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_presets_and_scaling_to_256px():
    assert RT_PRESETS["rt1"].noise_sigma == 0 and RT_PRESETS["rt2"].noise_sigma == 0.25
    _, mask = RandomTransform(RTConfig())(torch.rand(2, 3, 256, 256))
    assert mask.shape == (2, 1, 256, 256) and mask.mean().item() == pytest.approx(0.25)


def test_gradient_is_exact_through_rt():
    rt = RandomTransform(RTConfig(noise_sigma=0.0))
    x = (torch.rand(4, 3, 32, 32) * 0.8 + 0.1).requires_grad_(True)
    x_rt, mask = rt(x)
    x_rt.sum().backward()
    assert torch.equal(x.grad, (1 - mask).expand_as(x))


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="mask_fraction"):
        RTConfig(mask_fraction=1.0)
    with pytest.raises(ValueError, match="noise_sigma"):
        RTConfig(noise_sigma=-0.1)
    with pytest.raises(ValueError, match="not divisible"):
        RandomTransform(RTConfig(grid=8))(torch.rand(1, 3, 30, 30))
