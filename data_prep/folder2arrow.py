"""Convert an image folder (one sub-directory per identity) into Arrow shards.

    python -m data_prep.folder2arrow /data/my_faces /data/my_faces-arrow

Labels 0..K-1 follow the sorted identity folder names; images are the .jpg/.jpeg/.png files (any case) directly
inside each folder, sorted by name (`ds_face.data.folder`, which `ds_face.eval.embed --folder` lists too); `index` is
an image's position in that sorted listing. Files are stored byte for byte (PNG too: the loader decodes it).
classes.json in the output lists the folder name of each label.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from data_prep.convert import add_common_args, run_cli
from data_prep.source import Chunk, Source, SourceError, image_problem, source_error
from ds_face.data.folder import FolderError, list_image_folder
from ds_face.data.shards import MAX_IMAGE_BYTES

CLASSES = "classes.json"


@dataclass(frozen=True)
class FolderRows:
    """The worker side of a FolderSource: reads (path, label, index) items."""

    def rows(self, items: list[tuple[str, int, int]]) -> Iterator[tuple[bytes, int, int]]:
        for path, label, index in items:
            try:
                with open(path, "rb") as f:
                    image = f.read(MAX_IMAGE_BYTES + 1)  # bounded: image_problem names one that is larger
            except OSError as e:
                raise source_error(path, f"cannot read ({e.strerror})", index) from None
            if problem := image_problem(image):
                raise source_error(path, problem, index, 0)
            yield image, label, index


@dataclass
class FolderSource(Source):
    paths: list[str] = None
    labels: np.ndarray = None
    sizes: np.ndarray = None  # int64 bytes of each file, as listed

    def items(self, positions: np.ndarray) -> list[tuple[str, int, int]]:
        return [(self.paths[p], int(self.labels[p]), p) for p in positions.tolist()]

    def chunks(self, wanted: np.ndarray, chunk_bytes: int) -> Iterator[Chunk]:
        """One file read per image anyway: chunks only bound memory and batch the Arrow work."""
        positions = np.flatnonzero(wanted)
        ends = np.cumsum(self.sizes[positions])
        start = 0
        while start < len(positions):
            stop = max(start + 1, int(np.searchsorted(ends, ends[start] - self.sizes[positions[start]] + chunk_bytes,
                                                      side="right")))
            chunk = positions[start:stop]
            start = stop
            images = pa.array([image for image, _, _ in self.reader.rows(self.items(chunk))], pa.binary())
            yield Chunk(positions=chunk, labels=self.labels[chunk], indexes=chunk.astype(np.int64),
                        images=lambda rows, images=images: images.take(rows))


def open_folder_source(src: str | Path) -> FolderSource:
    """List the identities and their images (no image is read here: workers check each one as they copy it)."""
    try:
        folder = list_image_folder(src)
    except FolderError as err:
        raise SourceError(str(err)) from None
    big = np.flatnonzero(folder.sizes > MAX_IMAGE_BYTES)
    if len(big):  # before anything is written: the trainer refuses a shard that holds one
        raise source_error(folder.paths[big[0]], f"an image of {folder.sizes[big[0]]} bytes, more than the "
                                                 f"{MAX_IMAGE_BYTES >> 20} MiB an image may take", int(big[0]), 0)
    files_info = [{"file": str(folder.root.resolve()), "bytes": folder.nbytes, "images": len(folder.paths),
                   "listing_sha256": folder.listing_sha256}]
    return FolderSource(converter="data_prep.folder2arrow", indexes=np.arange(len(folder.paths), dtype=np.int64),
                        num_classes=len(folder.classes), image_size=[112, 112], files=files_info,
                        carried={CLASSES: (json.dumps(folder.classes, indent=0) + "\n").encode()},
                        nbytes=folder.nbytes, reader=FolderRows(), paths=folder.paths, labels=folder.labels,
                        sizes=folder.sizes)


def main(argv: list[str] | None = None, on_shard_done=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.folder2arrow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="directory with one sub-directory of images per identity")
    add_common_args(parser)
    args = parser.parse_args(argv)
    return run_cli(lambda: open_folder_source(args.src), args, on_shard_done)


if __name__ == "__main__":
    sys.exit(main())
