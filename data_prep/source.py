"""What a front-end (`data_prep.rec2arrow`, `data_prep.folder2arrow`) hands the conversion engine: a `Source`, one
entry per image in source order, read in `Chunk`s; and how it reports bad input (`SourceError`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from data_prep.recordio import RecordIOError
from ds_face.data.shards import MAX_IMAGE_BYTES
from ds_face.images import FORMATS



class SourceError(ValueError):
    """Bad input. The message names the file and, when known, the record key and byte offset.
    One string argument, so that it pickles back from a worker process unchanged."""


def source_error(path: str | os.PathLike, msg: str, key: int | None = None, offset: int | None = None) -> SourceError:
    """`<file>, key <k>, byte offset <o>: <msg>`, the same wording as `RecordIOError`."""
    return SourceError(str(RecordIOError(path, msg, record=None if key is None else f"key {key}", offset=offset)))


def image_problem(image: bytes) -> str | None:
    """Why `image` is not a JPEG or PNG file (checked by magic only: the loader decodes) of at most
    MAX_IMAGE_BYTES (the trainer refuses a shard holding a larger one), or None."""
    if len(image) > MAX_IMAGE_BYTES:
        return f"an image of {len(image)} bytes, more than the {MAX_IMAGE_BYTES >> 20} MiB an image may take"
    if any(image.startswith(magic) for magic in FORMATS.values()):
        return None
    if not image:
        return "empty image payload"
    return f"payload is not a JPEG or PNG image (first bytes: {image[:8].hex(' ')})"


@dataclass
class Chunk:
    """Source records read and checked together: `positions` (source positions, int64), `labels` and
    `indexes` (int64, one per position), and `images(rows)`, the binary Arrow array of those rows' images."""
    positions: np.ndarray
    labels: np.ndarray
    indexes: np.ndarray
    images: Callable[[np.ndarray], pa.Array]


@dataclass
class Source:
    """What a front-end hands the engine: `chunks(wanted)` reads it in one sequential pass (the conversion);
    `reader` (small, picklable) and `items(positions)` read single images (verify --source, and the slow path
    of a chunk reader)."""
    converter: str  # "data_prep.rec2arrow"
    indexes: np.ndarray  # int64: the `index` column value of every image, in source order
    num_classes: int
    image_size: list[int]  # height, width
    files: list[dict]  # {"file", "bytes", ...}: pinned in plan.json; file and bytes go into the manifest
    carried: dict[str, Path | bytes]  # output name -> file to copy, or content to write
    nbytes: int  # about the total image bytes, for choosing the shard count
    reader: Any  # .rows(items) -> iterator of (image bytes, label, index)

    def items(self, positions: np.ndarray) -> Any:
        raise NotImplementedError

    def chunks(self, wanted: np.ndarray, chunk_bytes: int) -> Iterator[Chunk]:
        """The positions where `wanted` (bool, one per position) is set, read in source order, in chunks of
        about `chunk_bytes` of input."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.indexes)
