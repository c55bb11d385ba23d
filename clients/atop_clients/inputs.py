"""What atop-classify reads: files, folders (recursively; an ImageFolder layout gives true labels), globs,
.tar/.tar.gz archives, and text files listing paths (@list.txt)."""

from __future__ import annotations

import glob
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Item:
    key: str  # how the item is named in the output (a path, or archive!member)
    read: Callable[[], bytes]
    label: str | None  # the true label, when the layout gives one


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in SUFFIXES


def _file(path: Path, label: str | None = None) -> Item:
    return Item(str(path), path.read_bytes, label)


def _folder(root: Path) -> Iterator[Item]:
    """ImageFolder when the root's images all sit in class subfolders: the first subfolder is the label."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p.name))
    image_folder = bool(files) and all(p.parent != root for p in files)
    for path in files:
        yield _file(path, path.relative_to(root).parts[0] if image_folder else None)


def _archive(path: Path) -> Iterator[Item]:
    """Members read up front (a .tar.gz cannot seek); the parent folder of a member is its label."""
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile() and _is_image(member.name):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                parent = Path(member.name).parent.name
                yield Item(f"{path}!{member.name}", lambda data=data: data, parent or None)


def expand(sources: list[str]) -> Iterator[Item]:
    for source in sources:
        if source.startswith("@"):
            lines = Path(source[1:]).read_text().splitlines()
            yield from expand([line.strip() for line in lines if line.strip() and not line.startswith("#")])
            continue
        path = Path(source)
        if path.is_dir():
            yield from _folder(path)
        elif path.is_file() and (path.suffix == ".tar" or path.name.endswith((".tar.gz", ".tgz"))):
            yield from _archive(path)
        elif path.is_file():
            yield _file(path)
        else:
            matches = sorted(glob.glob(source, recursive=True))
            if not matches:
                raise FileNotFoundError(f"{source}: no such file, folder or glob match")
            yield from expand(matches)
