"""An image folder, one sub-directory per identity, listed (nothing is read): what ``ds_face.eval.embed --folder``
embeds and ``data_prep.folder2arrow`` converts, so both see the same samples in the same order.

Labels 0..K-1 follow the sorted identity folder names (hidden ones skipped); images are the .jpg/.jpeg/.png
files (any case) directly inside each folder, sorted by name.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class FolderError(ValueError):
    """A folder that cannot be listed as identities of images; the message names the directory."""


@dataclass
class ImageFolder:
    root: Path
    classes: list[str]  # label -> identity folder name
    paths: list[str]  # one per image, in listing order
    labels: np.ndarray  # int64, one per image
    sizes: np.ndarray  # int64 bytes of each file, as listed
    listing_sha256: str  # pins names, sizes and mtimes (a conversion plan records it instead of every file)

    @property
    def nbytes(self) -> int:
        return int(self.sizes.sum())


def list_image_folder(src: str | os.PathLike) -> ImageFolder:
    root = Path(src)
    if not root.is_dir():
        raise FolderError(f"{root}: not a directory (expected one sub-directory per identity)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FolderError(f"{root}: no identity folders (expected one sub-directory per identity)")
    paths: list[str] = []
    labels: list[int] = []
    sizes: list[int] = []
    listing = sha256()
    for label, name in enumerate(classes):
        files = sorted((e for e in os.scandir(root / name)
                        if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)), key=lambda e: e.name)
        if not files:
            raise FolderError(f"{root / name}: no .jpg/.jpeg/.png images; every identity folder needs at least one "
                              f"(labels are contiguous: remove the folder or add images)")
        for entry in files:
            stat = entry.stat()
            paths.append(entry.path)
            labels.append(label)
            sizes.append(stat.st_size)
            listing.update(f"{name}/{entry.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return ImageFolder(root, classes, paths, np.asarray(labels, dtype=np.int64), np.asarray(sizes, dtype=np.int64),
                       listing.hexdigest())
