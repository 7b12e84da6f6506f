"""Arrow shards (written by `data_prep`) as a source of micro-batches: rows read from memory-mapped shards.

`ds_face.data.shards.open_shard` checks and memory-maps each shard (no copy, no cache files); a micro-batch's
rows, chosen by `ds_face.data.order` from the run's position alone, are read by random access, decoded
straight into the batch (`ds_face.images`: JPEG or PNG by their magic bytes, the size from the header first;
any other format stops the run), flipped by a coin fixed by (seed, epoch, row), and shipped as
uint8 (4x less to copy than float32, host to device included); the training step normalises to [-1, 1] on
the device (`normalize`), as arcface_torch does.

Why not `datasets`' streaming `IterableDataset`: it deals whole shards to ranks (`split_dataset_by_node`) and
shuffles through a buffer, so which sample a rank sees depends on the world size; a run resized after a lost
node could not continue with exactly the samples it had not seen. Here the order is one global sequence
(`ds_face.data.order`) and any rank can read any row.
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

from ds_face.data.options import ON_CORRUPT
from ds_face.data.seeds import flip_bits
from ds_face.data.cache import ShardCache
from ds_face.data.shards import ShardError, open_shard, read_manifest, shard_where
from ds_face.data.store import Store, StoreError, is_remote
from ds_face.images import ImageFormatError, decode, header_size

log = logging.getLogger("ds_face")


MAX_OPEN_REMOTE = 64  # remote shards a reader keeps mapped (a run reads about data.streams at a time)


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/ds_face/shards`` (``~/.cache/ds_face/shards``): node-local, per user."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ds_face", "shards")


class DataError(ValueError):
    """Training data that cannot be used as configured; the message names the directory, shard or sample."""


def decode_rgb(data: bytes, size: tuple[int, int] | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB (``ds_face.images.decode``), written into `out` when given; `size` (height, width) is
    checked from the header first, so an image of another size is refused before it is decoded."""
    if size is not None:
        height, width = header_size(data)
        if (height, width) != tuple(size):
            raise ValueError(f"image is {width}x{height}, expected {size[1]}x{size[0]}")
    return decode(data, out)


def flip_images(images: np.ndarray, which: np.ndarray) -> None:
    """Mirror ``images[which]`` (uint8 [B, H, W, 3]) left to right, in place. Each pixel is moved as one 3-byte
    item (a void view): 5x faster than flipping a gathered copy of the batch and scattering it back."""
    pixels = images.view(np.dtype((np.void, 3)))[..., 0]  # [B, H, W] of RGB triples
    for i in which.tolist():
        pixels[i] = pixels[i, :, ::-1]  # numpy copies through a buffer when source and target overlap


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1]: arcface_torch's ToTensor + Normalize(0.5, 0.5)."""
    out = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return out.div_(127.5).sub_(1.0)


class ArrowFaces:
    """A dataset directory written by `data_prep`, read row by row: ``make(epochs, rows)`` builds one
    micro-batch ``{"image": uint8 tensor [B, H, W, 3], "label", "sample" (int64 numpy), "corrupt" (a count)}``.
    Opened lazily in each process that reads (DataLoader workers included)."""

    def __init__(self, directory: str | os.PathLike, *, seed: int = 2048, flip: bool = True,
                 on_corrupt: str = "skip", cache_dir: str | os.PathLike | None = None, cache_gb: float = 0.0,
                 outage_minutes: float = 10.0):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        try:
            self.manifest = read_manifest(directory)
        except ShardError as err:
            raise DataError(str(err)) from None
        m = self.manifest
        self.directory, self.seed, self.flip, self.on_corrupt = str(directory), seed, flip, on_corrupt
        self.image_size = (m.image_size[0], m.image_size[1])
        self.num_classes = m.num_classes
        self.shard_rows = [s.rows for s in m.shards]
        self.shard_start = np.concatenate([[0], np.cumsum(self.shard_rows)[:-1]]).astype(np.int64)
        self.cache = None
        if is_remote(directory):  # shards in object storage: read from this node's cache of them
            store = Store(str(directory), outage_s=outage_minutes * 60)
            self.paths = [store.where(s.file) for s in m.shards]
            self.cache = ShardCache(store, m, cache_dir or default_cache_dir(), int(cache_gb * 2**30))
        else:
            self.paths = m.shard_paths(directory)
            missing = next((p for p in self.paths if not os.path.isfile(p)), None)
            if missing:
                raise DataError(f"{missing}: listed in {self.directory}/manifest.json but not found")
        self._tables: dict[int, _ShardRows] = {}  # opened on first use, in the process that reads (worker)

    def identity(self) -> dict:
        """What the order of samples depends on, besides the seed: resuming on other data is not the same run."""
        return {"source": "arrow", "num_samples": self.manifest.num_samples, "shard_rows_sha": _digest(self.shard_rows)}

    def _shard(self, shard: int) -> "_ShardRows":
        if shard not in self._tables:  # the pre-flight's reader and checks (schema, nulls, labels, row count)
            try:
                path = self.paths[shard] if self.cache is None else self.cache.get(shard)
                table = open_shard(path, self.manifest.shards[shard], self.num_classes,
                                   shard_where(self.directory, shard, self.paths[shard]))
            except (ShardError, StoreError) as err:
                raise DataError(str(err)) from None
            if self.cache is not None and len(self._tables) >= MAX_OPEN_REMOTE:
                self._tables.pop(next(iter(self._tables)))  # let go of its mapping: the cache may evict it
            self._tables[shard] = _ShardRows(table)  # memory-mapped: image pages are read when touched
        return self._tables[shard]

    def shards_of(self, rows: np.ndarray) -> np.ndarray:
        """The distinct shards that hold these dataset rows."""
        return np.unique(np.searchsorted(self.shard_start, rows, side="right") - 1)

    def make(self, epochs: np.ndarray, rows: np.ndarray) -> dict:
        """One micro-batch: the images of these dataset rows decoded into one uint8 array, flipped by their coins."""
        size = len(rows)
        batch = torch.empty((size, *self.image_size, 3), dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:  # a DataLoader worker: allocate the batch in shared
            batch.share_memory_()  # memory now, so that handing it to the trainer copies nothing
        images = batch.numpy()  # decoded into in place
        labels = np.empty(size, np.int64)
        shards = np.searchsorted(self.shard_start, rows, side="right") - 1
        local = rows - self.shard_start[shards]  # row within its shard
        data = [None] * size
        for shard in np.unique(shards).tolist():  # per shard: vectorised lookups, then one slice per image
            at = np.flatnonzero(shards == shard)
            part = self._shard(shard)
            labels[at] = part.labels[local[at]]
            for i, view in zip(at.tolist(), part.images(local[at])):
                data[i] = view
        good, corrupt = [], 0

        def where(i: int) -> str:
            return f"{self.paths[shards[i]]}, row {local[i]} (dataset row {rows[i]}, label {labels[i]})"

        for i, image in enumerate(data):
            try:
                decode_rgb(image, self.image_size, out=images[i])
                good.append(i)
            except ImageFormatError as err:  # data_prep writes JPEG and PNG only: not a damaged image of ours
                raise DataError(f"{where(i)}: {err}; data_prep writes only JPEG and PNG, so this shard was not "
                                f"written by it (data.on_corrupt skips damaged images, not other formats)") from None
            except Exception as err:  # noqa: BLE001 - any decoder error means this one sample is unusable
                if self.on_corrupt == "fail":
                    raise DataError(f"{where(i)}: cannot decode image: {err}") from None
                log.warning(f"skipping {where(i)}: cannot decode image ({err}); a good sample of the same "
                            f"micro-batch takes its place, so every rank keeps the same batch size")
                corrupt += 1
                labels[i] = -1
        if not good:
            raise DataError(f"{self.directory}: every image of a micro-batch failed to decode (rows "
                            f"{rows[:4].tolist()}...)")
        for i in np.flatnonzero(labels < 0):  # corrupt: copy a good sample of this micro-batch
            source = good[i % len(good)]
            images[i], labels[i] = images[source], labels[source]
        if self.flip:
            flip_images(images, np.flatnonzero(flip_bits(self.seed, epochs, rows)))
        return {"image": batch, "label": labels, "sample": rows, "corrupt": corrupt}



class _ShardRows:
    """One memory-mapped shard's rows: where each image's bytes lie (chunk, start, end) and the labels, as
    numpy arrays built once, so that reading a row is one slice of a memoryview over the mapped file."""

    def __init__(self, table):
        images = table.column("image").chunks
        self.count = table.num_rows
        self.views = [memoryview(c.buffers()[2] or b"").cast("B") for c in images]  # bytes, not signed chars
        chunk, start, end = [], [], []
        for k, c in enumerate(images):
            offsets = np.frombuffer(c.buffers()[1], dtype=np.int32)[c.offset:c.offset + len(c) + 1]
            chunk.append(np.full(len(c), k, np.int64))
            start.append(offsets[:-1].astype(np.int64))
            end.append(offsets[1:].astype(np.int64))
        self.chunk, self.start, self.end = (np.concatenate(x) if x else np.empty(0, np.int64)
                                            for x in (chunk, start, end))
        self.labels = table.column("label").to_numpy()

    def images(self, local: np.ndarray) -> list[memoryview]:
        views = self.views
        return [views[c][s:e] for c, s, e in zip(self.chunk[local].tolist(), self.start[local].tolist(),
                                                   self.end[local].tolist())]


def _digest(values: list[int]) -> str:
    import hashlib
    return hashlib.sha256(np.asarray(values, dtype=np.int64).tobytes()).hexdigest()[:16]
