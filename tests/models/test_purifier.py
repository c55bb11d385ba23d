import pytest
import torch

from atop_models.discriminator import DISCRIMINATORS, SNPatchGAN
from atop_models.purifiers import PURIFIERS
from atop_models.purifiers.layers import ContextualAttention
from atop_models.rt import RandomTransform, RTConfig

ARCHS = {"deepfillv2": {"cnum": 8}, "unet": {"width": 8, "groups": 4}}


@pytest.mark.parametrize("size", [32, 256])
@pytest.mark.parametrize("arch", ARCHS)
def test_generator_shapes_and_range(size, arch):
    torch.manual_seed(0)
    generator = PURIFIERS.create(arch, **ARCHS[arch])
    x_rt, mask = RandomTransform(RTConfig())(torch.rand(2, 3, size, size))
    coarse, refined = generator(x_rt, mask)
    assert coarse.shape == refined.shape == (2, 3, size, size)
    for out in (coarse, refined):
        assert out.min() >= 0 and out.max() <= 1


def test_default_width_matches_deepfillv2_scale():
    params = sum(p.numel() for p in PURIFIERS.create("deepfillv2", cnum=48).parameters())
    assert 3.0e6 < params < 4.5e6  # DeepFillv2 at cnum 48: ~4.05 M
    assert sum(p.numel() for p in SNPatchGAN().parameters()) == pytest.approx(5.95e6, rel=0.01)


@pytest.mark.parametrize(("arch", "size", "multiple"), [("deepfillv2", 36, 8), ("unet", 34, 4)])
def test_generator_refuses_sizes_it_cannot_process(arch, size, multiple):
    generator = PURIFIERS.create(arch, **ARCHS[arch])
    with pytest.raises(ValueError, match=f"multiple of {multiple}"):
        generator(torch.rand(1, 3, size, size), torch.zeros(1, 1, size, size))


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_generator_never_mixes_samples(arch):
    torch.manual_seed(0)
    generator = PURIFIERS.create(arch, **ARCHS[arch]).eval()
    x_rt, mask = RandomTransform(RTConfig())(torch.rand(5, 3, 32, 32), torch.Generator().manual_seed(1))
    together = generator(x_rt, mask)[1]
    alone = torch.cat([generator(x_rt[i : i + 1], mask[i : i + 1])[1] for i in range(5)])
    assert torch.allclose(together, alone, atol=1e-5)


def test_untrained_unet_is_the_identity_on_visible_pixels():
    generator = PURIFIERS.create("unet", width=8, groups=4)
    x_rt, mask = RandomTransform(RTConfig())(torch.rand(3, 3, 32, 32), torch.Generator().manual_seed(0))
    coarse, refined = generator(x_rt, mask)
    assert torch.equal(coarse, refined)  # one stage: its output twice
    assert torch.allclose(refined * (1 - mask), x_rt * (1 - mask), atol=1e-6)  # zero-initialized head
    assert torch.allclose(refined * mask, 0.5 * mask)  # holes start mid-grey ([-1,1] zero)


def test_contextual_attention_fills_holes_from_known_patches_only():
    attention = ContextualAttention(rate=2)
    features = torch.rand(2, 4, 16, 16)
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, :32] = 1  # top half of the image is a hole
    features[:, :, 8:] = 0.7  # every usable background patch carries the constant 0.7 ...
    features[:, :, :8] = torch.rand(2, 4, 8, 16) * 5  # ... the hole holds garbage, which must not be copied
    out = attention(features, mask)
    assert out.shape == features.shape
    # Every output pixel, inside the hole or not, is pasted from known patches only: exactly 0.7.
    assert torch.allclose(out, torch.full_like(out, 0.7), atol=1e-5)


def test_discriminator_scores_patches_and_is_spectrally_normalized():
    discriminator = DISCRIMINATORS.create("sn_patchgan", cnum=16, layers=4)
    scores = discriminator(torch.rand(3, 3, 32, 32), torch.zeros(3, 1, 32, 32))
    assert scores.shape == (3, 4 * 16 * 2 * 2)
    first = discriminator.body[0]
    assert hasattr(first, "parametrizations")
    for _ in range(20):  # power iteration converges in training mode
        discriminator(torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32))
    assert torch.linalg.matrix_norm(first.weight.detach().flatten(1), ord=2).item() == pytest.approx(1.0, abs=0.05)
