import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from atop_models.data import BatchLoader, LoaderConfig, decode_image, load_split, random_crop_flip
from atop_server.codec import decode_image as serve_decode


def test_loads_real_cifar_jpegs_from_a_folder(cifar_folder, tmp_path):
    train = load_split(cifar_folder, "train", 32, tmp_path / "cache")
    test = load_split(cifar_folder, "test", 32, tmp_path / "cache")
    assert train.classes == test.classes
    assert train.classes[:3] == ["airplane", "automobile", "bird"] and len(train.classes) == 10
    assert train.images.shape == (200, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.labels.bincount().tolist() == [10] * 10
    first = sorted((cifar_folder / "train" / "airplane").iterdir())[0]
    assert torch.equal(train.images[0], torch.from_numpy(np.array(Image.open(first).convert("RGB"))).permute(2, 0, 1))


def test_loads_a_tar_gz_and_caches_the_decoded_arrays(cifar_folder, tmp_path):
    archive = tmp_path / "slice.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_folder, arcname="cifar10")  # one top folder, as the shared archive has
    cache = tmp_path / "cache"
    from_tar = load_split(archive, "test", 32, cache)
    assert len(list((cache / "decoded").iterdir())) == 1
    again = load_split(archive, "test", 32, cache)  # from the .npy cache
    assert torch.equal(from_tar.images, again.images) and from_tar.classes == again.classes
    assert torch.equal(from_tar.images, load_split(cifar_folder, "test", 32, tmp_path / "other").images)


def test_archive_with_unsafe_paths_is_refused(tmp_path):
    image = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8)).save(image)
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(image, arcname="../../escaped.jpg")
    with pytest.raises(ValueError, match="unsafe path"):
        load_split(archive, "train", 32, tmp_path / "cache")
    assert not (tmp_path / "escaped.jpg").exists()


def test_resizes_and_converts_any_mode(tmp_path):
    folder = tmp_path / "data" / "train"
    for label, mode in (("gray", "L"), ("palette", "P"), ("alpha", "RGBA")):
        (folder / label).mkdir(parents=True)
        Image.new(mode, (50, 40)).save(folder / label / "a.png")
    arrays = load_split(tmp_path / "data", "train", 32, tmp_path / "cache")
    assert arrays.images.shape == (3, 3, 32, 32) and arrays.classes == ["alpha", "gray", "palette"]


def test_training_decodes_every_image_as_the_server_does(tmp_path):
    """No train/serve skew: an EXIF-rotated photo, palette, alpha, grayscale and an animation (first frame)."""
    rng = np.random.default_rng(0)
    pixels = Image.fromarray(rng.integers(0, 256, (20, 12, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; viewers (and the server) turn it upright
    files = {"rotated.jpg": (pixels, {"exif": exif}), "palette.png": (pixels.convert("P"), {})}
    files |= {"alpha.png": (pixels.convert("RGBA"), {}), "gray.png": (pixels.convert("L"), {})}
    frames = [pixels, pixels.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    files["animated.gif"] = (frames[0], {"save_all": True, "append_images": frames[1:]})
    for name, (image, options) in files.items():
        image.save(tmp_path / name, **options)
        trained = decode_image(tmp_path / name, 16)
        np.testing.assert_array_equal(trained, serve_decode((tmp_path / name).read_bytes(), 16, 0), err_msg=name)
    upright = decode_image(tmp_path / "rotated.jpg", 16)
    sideways = np.asarray(Image.open(tmp_path / "rotated.jpg").convert("RGB").resize((16, 16), Image.BICUBIC))
    assert np.abs(upright.astype(int) - sideways).mean() > 20  # the orientation was applied, not ignored


def test_missing_split_and_bad_source_are_clear_errors(tmp_path):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        load_split(tmp_path / "data", "test", 32, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="no images"):
        load_split(tmp_path / "data", "train", 32, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        load_split(tmp_path / "nothing", "train", 32, tmp_path / "cache")


def test_balanced_subset(cifar_folder, tmp_path):
    arrays = load_split(cifar_folder, "train", 32, tmp_path / "cache")
    assert arrays.subset(50).labels.bincount().tolist() == [5] * 10


def test_a_subset_decodes_only_its_own_images(cifar_folder, tmp_path):
    """Each class's last file is not an image: decoding the whole split fails, a subset never reads them."""
    whole = load_split(cifar_folder, "train", 32, tmp_path / "cache")
    broken = tmp_path / "broken"
    shutil.copytree(cifar_folder / "train", broken / "train")
    for label in whole.classes:
        (broken / "train" / label / "zzz-last.jpg").write_bytes(b"not a jpeg")
    subset = load_split(broken, "train", 32, tmp_path / "cache", count=50)
    expected = whole.subset(50)
    assert torch.equal(subset.images, expected.images) and torch.equal(subset.labels, expected.labels)
    assert torch.equal(load_split(broken, "train", 32, tmp_path / "cache", count=50).images, subset.images)  # cached
    with pytest.raises(OSError, match="cannot identify image file"):
        load_split(broken, "train", 32, tmp_path / "cache")
    # A split decoded whole before serves every subset from its cache.
    assert torch.equal(load_split(cifar_folder, "train", 32, tmp_path / "cache", count=50).images, expected.images)


def test_ranks_take_disjoint_equal_shards(synthetic_folder, tmp_path):
    data = load_split(synthetic_folder, "train", 32, tmp_path / "cache")
    config = LoaderConfig(batch_size=16)
    seen = []
    for rank in range(2):
        loader = BatchLoader(data, config, torch.device("cpu"), seed=3, rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == len(loader) == len(data) // 2 // 16
        seen.append({tuple(x.flatten()[:64].tolist()) for xb, _ in batches for x in xb})
    assert not seen[0] & seen[1]


def test_loader_order_depends_on_seed_and_epoch_only(synthetic_folder, tmp_path):
    data = load_split(synthetic_folder, "train", 32, tmp_path / "cache")
    config = LoaderConfig(batch_size=32, augment=True, image_size=64)
    a, b = (BatchLoader(data, config, torch.device("cpu"), seed=1) for _ in range(2))
    b.set_epoch(0)
    xa, ya = next(iter(a))
    xb, yb = next(iter(b))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert xa.shape == (32, 3, 64, 64) and xa.min() >= 0 and xa.max() <= 1
    b.set_epoch(1)
    assert not torch.equal(next(iter(b))[1], ya)


def test_random_crop_flip_moves_content_per_sample():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8).repeat(200, 1, 1, 1)
    out = random_crop_flip(x, pad=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert (out == x).flatten(1).all(1).float().mean() < 0.2  # most samples moved
    flipped = (out == x.flip(3)).flatten(1).all(1)
    assert flipped.any()  # some samples flipped without shift


def test_alternating_flip_shows_each_image_both_ways_on_consecutive_epochs(synthetic_folder, tmp_path):
    data = load_split(synthetic_folder, "train", 32, tmp_path / "cache")
    config = LoaderConfig(batch_size=len(data), augment=True, crop_pad=0, flip="alternate", shuffle=False)
    loader = BatchLoader(data, config, torch.device("cpu"), seed=5)
    originals = data.images.float() / 255.0
    asymmetric = ~(originals == originals.flip(3)).flatten(1).all(1)
    mirrored = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        x, _ = next(iter(loader))
        as_is, flipped = ((x == view).flatten(1).all(1) for view in (originals, originals.flip(3)))
        assert (as_is | flipped).all()  # no crop offset with crop_pad 0: each image is itself or its mirror
        mirrored.append(flipped[asymmetric])
    assert (mirrored[0] ^ mirrored[1]).all() and torch.equal(mirrored[0], mirrored[2])
    assert 0.3 < mirrored[0].float().mean() < 0.7  # the first epoch's choice is a fair coin per image
