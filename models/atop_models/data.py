"""Training data: ImageFolder directories, .tar/.tar.gz archives of them, and torchvision's CIFAR downloaders.

Images are decoded once (Pillow, a thread pool), resized to a fixed size and kept in memory as one uint8
tensor; decoded arrays are cached as .npy (no pickle) so later runs start at once. Batches are cut, moved
to the device and augmented there (random crop with reflect padding, horizontal flip), airbench style:
on 2 CPU cores per-image Python transforms would cost more than the small networks do.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from atop_proto.images import rgb_array

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DOWNLOADABLE = ("cifar10", "cifar100")
# The trainer's and evaluators' --data-source: torchvision's CIFAR-10 downloader works on any machine with internet
# access. The shipped models were trained and measured on a JPEG re-encoding of CIFAR-10 (models/zoo/README.md),
# which the Makefile and the tests pass explicitly.
DEFAULT_SOURCE = "cifar10"
SOURCE_HELP = "an ImageFolder folder holding train/ and test/, a .tar(.gz) of one, or cifar10 / cifar100 (download)"


@dataclass
class ImageArrays:
    images: torch.Tensor  # uint8 [N,3,H,W]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int) -> ImageArrays:
        """The first `count` images of every class taken round-robin, so small subsets stay balanced."""
        keep = balanced_indices(self.labels, len(self.classes), count)
        return ImageArrays(self.images[keep], self.labels[keep], self.classes)


def balanced_indices(labels: torch.Tensor, num_classes: int, count: int) -> torch.Tensor:
    """Ascending indices of the first images of every class taken round-robin, `count` in all."""
    rank_in_class = torch.empty_like(labels)
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        rank_in_class[members] = torch.arange(len(members))
    return torch.argsort(rank_in_class * num_classes + labels)[:count].sort().values


def _is_archive(path: Path) -> bool:
    return path.is_file() and (path.suffix == ".tar" or path.name.endswith((".tar.gz", ".tgz")))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def extract_archive(archive: Path, cache_dir: Path) -> Path:
    """Extract once into cache_dir/<name>-<content hash>; the marker file makes an interrupted extract redo."""
    target = cache_dir / f"{archive.name.split('.')[0]}-{_file_digest(archive)}"
    marker = target / ".complete"
    if not marker.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            # Regular files only, inside target: an image set needs no links or devices, and a hostile archive
            # must not write outside the cache (tarfile's filter= is missing from Python < 3.11.4).
            for member in tar:
                path = Path(member.name)
                if path.is_absolute() or ".." in path.parts:
                    raise ValueError(f"{archive} holds an unsafe path {member.name!r}")
                if member.isfile():
                    (target / path).parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as source, open(target / path, "wb") as out:  # type: ignore[union-attr]
                        shutil.copyfileobj(source, out)
        marker.touch()
    return target


def find_split_dir(root: Path, split: str) -> Path:
    """`root/split`, or `root/<one level>/split` (archives usually hold one top folder), or root itself when
    it is an ImageFolder of class folders and split is the only one asked for."""
    for candidate in [root / split, *(p / split for p in sorted(root.iterdir()) if p.is_dir())]:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no '{split}' split folder under {root} (expected {root}/{split}/<class>/<image>)")


def list_image_folder(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{folder} has no class folders")
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [index] * len(found)
    if not files:
        raise FileNotFoundError(f"{folder} has class folders but no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, labels, classes


def decode_image(path: Path, size: int) -> np.ndarray:
    """Any Pillow-readable image -> RGB uint8 [size,size,3], exactly as the server decodes it (atop_proto.images:
    first frame, EXIF orientation, mode conversion): the trainer sees what the served model will see."""
    with Image.open(path) as image:
        return rgb_array(image, size, size)


def _load_folder(folder: Path, size: int, workers: int, count: int) -> ImageArrays:
    """Decode the folder's images, or only the class-balanced `count` of them (0: all) that a run will use."""
    files, labels, classes = list_image_folder(folder)
    if count:
        keep = balanced_indices(torch.tensor(labels), len(classes), count).tolist()
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    with ThreadPoolExecutor(workers) as pool:
        decoded = list(
            tqdm(
                pool.map(lambda p: decode_image(p, size), files),
                total=len(files),
                desc=f"decode {folder.name}",
            )
        )
    images = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()
    return ImageArrays(images, torch.tensor(labels, dtype=torch.long), classes)


def _load_torchvision(name: str, split: str, size: int, cache_dir: Path) -> ImageArrays:
    import torchvision  # only needed for the downloaders

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[name]
    dataset = cls(str(cache_dir / name), train=(split == "train"), download=True)
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    if images.shape[-1] != size:
        images = F.interpolate(images.float(), size=(size, size), mode="bicubic").round().clamp(0, 255)
        images = images.to(torch.uint8)
    return ImageArrays(images, torch.tensor(dataset.targets, dtype=torch.long), list(dataset.classes))


def load_split(
    source: str | Path, split: str, size: int, cache_dir: str | Path = ".data", workers: int = 4, count: int = 0
) -> ImageArrays:
    """Load `split` ('train' or 'test') of a data source, every image resized to size x size; count > 0: only a
    class-balanced subset of that many images (ImageArrays.subset's), and only those are decoded.

    source: 'cifar10' / 'cifar100' (torchvision download into cache_dir), an ImageFolder directory holding
    <split>/<class>/<image>, or a .tar / .tar.gz of one.
    """
    cache_dir = Path(cache_dir)
    if str(source) in DOWNLOADABLE:
        arrays = _load_torchvision(str(source), split, size, cache_dir)
        return arrays.subset(count) if count else arrays
    root = Path(source)
    if _is_archive(root):
        root = extract_archive(root, cache_dir)
    elif not root.is_dir():
        raise FileNotFoundError(f"data source {source} is neither a folder, a .tar(.gz), nor one of {DOWNLOADABLE}")
    folder = find_split_dir(root, split)
    whole = _cache_folder(cache_dir, folder, size, 0)
    if (whole / "classes.txt").exists():  # a previous run decoded the whole split: cut the subset from it
        arrays = _read_cache(whole)
        return arrays.subset(count) if count else arrays
    cached = _cache_folder(cache_dir, folder, size, count)
    if (cached / "classes.txt").exists():
        return _read_cache(cached)
    arrays = _load_folder(folder, size, workers, count)
    cached.mkdir(parents=True, exist_ok=True)
    np.save(cached / "images.npy", arrays.images.numpy())
    np.save(cached / "labels.npy", arrays.labels.numpy())
    (cached / "classes.txt").write_text("\n".join(arrays.classes) + "\n")  # written last: marks completeness
    return arrays


def _cache_folder(cache_dir: Path, folder: Path, size: int, count: int) -> Path:
    # The whole split keeps its original key, so caches of earlier versions still count.
    subset = f"|{count}" if count else ""
    return cache_dir / "decoded" / hashlib.sha256(f"{folder.resolve()}|{size}{subset}".encode()).hexdigest()[:16]


def _read_cache(cached: Path) -> ImageArrays:
    return ImageArrays(
        torch.from_numpy(np.load(cached / "images.npy", allow_pickle=False)),
        torch.from_numpy(np.load(cached / "labels.npy", allow_pickle=False)),
        (cached / "classes.txt").read_text().splitlines(),
    )


def random_crop_flip(
    x: torch.Tensor, pad: int, generator: torch.Generator | None = None, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample random crop (reflect padding `pad`) and horizontal flip of a [B,C,H,W] batch.
    `flip` ([B] bool) sets which images are mirrored; None draws each with probability 1/2."""
    batch, _, height, width = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    # Offsets are drawn on the CPU (where `generator` lives), then index the batch on its own device.
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    if flip is None:
        flip = torch.rand(batch, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(height))[:, :, None]  # [B,H,1]
    cols = dx[:, None] + torch.arange(width)  # [B,W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, :]  # [B,1,W]
    batch_index = torch.arange(batch)[:, None, None]
    index = tuple(i.to(x.device) for i in (batch_index, rows, cols))
    return padded.permute(0, 2, 3, 1)[index].permute(0, 3, 1, 2).contiguous()


class TooFewImages(ValueError):
    """A loader whose data fill no batch (a subset smaller than the batch size): the caller's to fix."""


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 256  # images per step on each process
    image_size: int = 32  # batches are resized on the device to this size (e.g. CIFAR at 256 px as upstream)
    augment: bool = False  # random crop + flip; on for classifier training
    crop_pad: int = 4  # pixels of reflect padding for the random crop, at the stored size
    # "alternate": each image's mirroring is drawn once (from the seed) and inverted every other epoch, so
    # consecutive epochs show it both ways (airbench: beats a fresh coin per view whenever flips help).
    flip: Literal["random", "alternate"] = "random"
    shuffle: bool = True
    drop_last: bool = True


class BatchLoader:
    """Yields (x float [0,1] on `device`, y) batches. Under DDP each rank takes an equal-sized shard of one
    shared permutation, so all ranks run the same number of steps (a mismatch would hang the all-reduce)."""

    def __init__(
        self,
        data: ImageArrays,
        config: LoaderConfig,
        device: torch.device,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.data, self.config, self.device = data, config, device
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        per_rank = len(data) // world_size
        full, rest = divmod(per_rank, config.batch_size)
        self.num_batches = full if config.drop_last or rest == 0 else full + 1
        if self.num_batches == 0:
            raise TooFewImages(f"{len(data)} images over {world_size} process(es) make no batch of {config.batch_size}")

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _alternating_flips(self) -> torch.Tensor:
        """[N] bool: which images are mirrored this epoch (fixed per image, inverted on odd epochs)."""
        first = torch.rand(len(self.data), generator=torch.Generator().manual_seed(self.seed)) < 0.5
        return first ^ bool(self.epoch % 2)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        flips = self._alternating_flips() if self.config.augment and self.config.flip == "alternate" else None
        n = len(self.data)
        order = torch.randperm(n, generator=generator) if self.config.shuffle else torch.arange(n)
        per_rank = n // self.world_size
        shard = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        size = self.config.batch_size
        for b in range(self.num_batches):
            index = shard[b * size : (b + 1) * size]
            x = self.data.images[index].to(self.device, non_blocking=True).float().div_(255.0)
            y = self.data.labels[index].to(self.device, non_blocking=True)
            if self.config.augment:
                x = random_crop_flip(x, self.config.crop_pad, generator, None if flips is None else flips[index])
            if x.shape[-1] != self.config.image_size:
                x = F.interpolate(x, size=(self.config.image_size,) * 2, mode="bilinear", align_corners=False)
            yield x, y
