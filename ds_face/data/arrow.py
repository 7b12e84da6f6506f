"""Arrow shards (written by `data_prep`) streamed with HuggingFace `datasets` into per-rank micro-batches.

The path of one image:

    shard file ──load_dataset("arrow", streaming=True)──▶ .shuffle(seed, buffer): shard order + buffer
      ──split_dataset_by_node──▶ this rank's whole shards ──DataLoader worker──▶ that worker's shards
      ──_WorkerStream──▶ decode (simplejpeg, PIL for other formats) · horizontal flip · uint8 batch
      ──ArrowFaces.__iter__ (main process)──▶ workers' last partial batches merged · [-1, 1] float

**Equal batches on every rank.** `datasets` deals whole shards to ranks and then to workers; shards hold
equal rows (the first `N % S` one more), so every (rank, worker) stream holds at least
`S / (world x workers) x floor(N / S)` rows. Each rank yields exactly `floor(that x workers / micro_batch)`
micro-batches, rounded down to whole optimizer steps: the same on every rank, so no collective ever waits
on a rank that ran out. When the shards are exactly equal this is floor(samples / global batch) steps.

**Resumable.** `state_dict()` records how many rows of each worker's stream this rank has consumed. The
streams are deterministic for a seed and epoch (shard order, shuffle buffer, and a flip decided by the
sample's index), so `load_state_dict()` makes each worker replay its stream without decoding up to that
row: the rest of the epoch holds exactly the samples not yet seen, shuffle-buffer contents included.
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
from PIL import Image

from ds_face.data.shards import ShardError, read_manifest

log = logging.getLogger("ds_face")
ON_CORRUPT = ("skip", "fail")
_JPEG_SOI = b"\xff\xd8\xff"


class DataError(ValueError):
    """Training data that cannot be used as configured; the message names the directory, shard or sample."""


def decode_rgb(data: bytes, size: tuple[int, int] | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB, written into `out` when given; `size` (height, width) is checked first.

    simplejpeg (libjpeg-turbo) decodes a 112x112 JPEG in about 60 us vs PIL's 120 us here
    (`python -m ds_face.bench.loader`, BENCHMARKS.md); PIL takes anything else (PNG from image folders)."""
    if data[:3] == _JPEG_SOI:
        height, width = simplejpeg.decode_jpeg_header(data)[:2]
        _check_size(height, width, size)
        return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
    with Image.open(io.BytesIO(data)) as image:
        _check_size(image.height, image.width, size)
        pixels = np.asarray(image.convert("RGB"))
    if out is None:
        return pixels
    out[...] = pixels
    return out


def _check_size(height: int, width: int, size: tuple[int, int] | None) -> None:
    if size is not None and (height, width) != tuple(size):
        raise ValueError(f"image is {width}x{height}, expected {size[1]}x{size[0]}")


def flip_coin(seed: int, epoch: int, index: int) -> bool:
    """A fair coin fixed by (seed, epoch, sample index): the same flip after a resume, whatever the position."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)  # splitmix64 finaliser
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return bool((x ^ (x >> 31)) & 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1]: arcface_torch's ToTensor + Normalize(0.5, 0.5)."""
    out = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return out.div_(127.5).sub_(1.0)


@dataclass(frozen=True)
class StreamCounts:
    """How many rows and batches the streams of one epoch are guaranteed, from the manifest alone."""
    streams: int  # world size x loader workers
    rows_per_stream: int  # lower bound, whichever shards `datasets` deals to a stream this epoch
    micro_batches: int  # per rank per epoch, a multiple of the accumulation
    steps_per_epoch: int


def count_streams(num_samples: int, num_shards: int, micro_batch: int, accumulation: int, world_size: int,
                  num_workers: int, where: str = "dataset") -> StreamCounts:
    workers = max(num_workers, 1)
    streams = world_size * workers
    if num_shards % streams:
        ok = [w for w in range(1, 65) if num_shards % (world_size * w) == 0]
        fix = (f"set data.num_workers to one of {ok}" if ok else
               f"re-convert with --shards a multiple of {streams}")
        raise DataError(f"{where}: {num_shards} shards cannot be dealt out evenly to {world_size} ranks x "
                        f"{workers} loader workers ({streams} streams); `datasets` would then make every rank "
                        f"read every shard and ranks would get different numbers of batches. {fix}")
    rows_per_stream = num_shards // streams * (num_samples // num_shards)
    micro = rows_per_stream * workers // micro_batch // accumulation * accumulation
    return StreamCounts(streams, rows_per_stream, micro, micro // accumulation)


class _WorkerStream(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker: this worker's rows -> decoded, flipped uint8 batches.

    Yields full batches and then one last partial batch; each says which worker made it, so that the main
    process can count consumed rows per worker."""

    def __init__(self, rows, micro_batch: int, seed: int, epoch: int, flip: bool, on_corrupt: str,
                 skip_rows: list[int], image_size: tuple[int, int]):
        self.rows, self.micro_batch, self.seed, self.epoch = rows, micro_batch, seed, epoch
        self.flip, self.on_corrupt, self.skip_rows, self.image_size = flip, on_corrupt, skip_rows, image_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rows = iter(self.rows)  # `datasets` picks this worker's shards itself
        for _ in range(self.skip_rows[worker]):  # replay without decoding: same shuffle buffer afterwards
            next(rows)
        batch = _BatchBuffer(self.micro_batch, self.image_size, worker)
        owed = 0  # corrupt samples met before any good one, filled by the first good one
        good = None  # (image, label, index) of the latest good sample
        for row in rows:
            try:
                image = decode_rgb(row["image"], self.image_size, out=batch.next_slot())
            except Exception as err:  # noqa: BLE001 - any decoder error means this one sample is unusable
                where = f"sample index {row['index']} (label {row['label']})"
                if self.on_corrupt == "fail":
                    raise DataError(f"{where}: cannot decode image: {err}") from None
                log.warning(f"skipping {where}: cannot decode image ({err}); reusing the previous good sample "
                            f"so every rank keeps the same number of batches")
                batch.corrupt += 1
                if good is None:
                    owed += 1
                    continue
                image, label, index = good
                batch.next_slot()[...] = image
            else:
                label, index = row["label"], row["index"]
                good = (image, label, index)  # a view into a batch that is never reused: no copy needed
            for copy in range(1 + owed):
                if copy:
                    batch.next_slot()[...] = image
                if batch.add(label, self.flip and flip_coin(self.seed, self.epoch, index)):
                    if good is not None:  # take() flips the batch in place; keep the sample as decoded
                        good = (good[0].copy(), *good[1:])
                    yield batch.take()
                    batch = _BatchBuffer(self.micro_batch, self.image_size, worker)
            owed = 0
        if batch.size:
            yield batch.take()


class _BatchBuffer:
    """One micro-batch being filled in place: images are decoded straight into their slot and flipped
    together at the end."""

    def __init__(self, micro_batch: int, image_size: tuple[int, int], worker: int):
        self.images = np.empty((micro_batch, *image_size, 3), np.uint8)
        self.labels = np.empty(micro_batch, np.int64)
        self.flips = np.zeros(micro_batch, bool)
        self.size, self.worker, self.corrupt = 0, worker, 0

    def next_slot(self) -> np.ndarray:
        return self.images[self.size]

    def add(self, label: int, flip: bool) -> bool:
        """Accept the image in the next slot; True when the batch is full."""
        self.labels[self.size], self.flips[self.size] = label, flip
        self.size += 1
        return self.size == len(self.labels)

    def take(self) -> dict:
        n = self.size
        images = torch.from_numpy(self.images[:n])
        flipped = torch.from_numpy(np.flatnonzero(self.flips[:n]))
        images[flipped] = images[flipped].flip(2)  # horizontal: the width axis; torch does it 2x faster than numpy
        return {"image": images, "label": torch.from_numpy(self.labels[:n]),
                "worker": self.worker, "corrupt": self.corrupt}


class ArrowFaces:
    """Per-rank micro-batches ``{"image": float [B, 3, H, W] in [-1, 1], "label": int64 [B]}`` from a
    directory written by `data_prep`; the same interface as `SyntheticFaces`."""

    def __init__(self, directory: str | os.PathLike, micro_batch: int, accumulation: int, rank: int,
                 world_size: int, *, num_workers: int = 2, seed: int = 2048, shuffle_buffer: int = 10_000,
                 flip: bool = True, on_corrupt: str = "skip"):
        from datasets import load_dataset
        from datasets.distributed import split_dataset_by_node

        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        try:
            self.manifest = read_manifest(directory)
        except ShardError as err:
            raise DataError(str(err)) from None
        m = self.manifest
        self.directory, self.micro_batch, self.accumulation = str(directory), micro_batch, accumulation
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.flip, self.on_corrupt = seed, flip, on_corrupt
        self.image_size = (m.image_size[0], m.image_size[1])
        self.counts = count_streams(m.num_samples, len(m.shards), micro_batch, accumulation, world_size,
                                    num_workers, where=self.directory)
        self.steps_per_epoch = self.counts.steps_per_epoch
        self.num_classes = m.num_classes
        paths = m.shard_paths(directory)
        missing = next((p for p in paths if not os.path.isfile(p)), None)
        if missing:
            raise DataError(f"{missing}: listed in {self.directory}/manifest.json but not found")
        dataset = load_dataset("arrow", data_files={"train": paths}, split="train", streaming=True)
        # Same seed on every rank: the shard order must agree before the ranks take their share of it.
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer > 1 else dataset
        self.rows = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.epoch = 0
        self._skip_rows = [0] * max(num_workers, 1)  # rows of each worker's stream already consumed
        self._position = 0  # micro-batches already yielded this epoch
        self.corrupt_images = 0

    def __len__(self) -> int:
        return self.counts.micro_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._skip_rows, self._position = [0] * len(self._skip_rows), 0

    def state_dict(self) -> dict:
        """Where this rank is in the epoch; taken between micro-batches."""
        return {"epoch": self.epoch, "micro_batches": self._position, "rows_per_worker": list(self._skip_rows),
                "world_size": self.world_size, "num_workers": self.num_workers, "micro_batch": self.micro_batch,
                "seed": self.seed, "num_samples": self.manifest.num_samples}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        same = all(state[k] == getattr(self, k) for k in ("world_size", "num_workers", "micro_batch", "seed"))
        if same and state["num_samples"] == self.manifest.num_samples:
            self._skip_rows, self._position = list(state["rows_per_worker"]), state["micro_batches"]
            return
        # Another layout deals the shards differently: skip the same share of the epoch instead.
        done = state["micro_batches"] * state["micro_batch"] * state["world_size"]  # samples, all ranks
        workers = max(self.num_workers, 1)
        per_worker = done // (self.world_size * workers)
        self._position = min(per_worker * workers // self.micro_batch, len(self))
        self._position -= self._position % self.accumulation  # resume at an optimizer-step boundary
        self._skip_rows = [self._position * self.micro_batch // workers] * workers
        log.warning(f"data position saved with another layout ({state['world_size']} ranks x "
                    f"{state['num_workers']} workers x micro-batch {state['micro_batch']}); resuming epoch "
                    f"{self.epoch} after {self._position} of {len(self)} micro-batches: the skipped share is "
                    f"right, the skipped samples are not exactly the ones seen")

    def __iter__(self):
        self.rows.set_epoch(self.epoch)
        stream = _WorkerStream(self.rows, self.micro_batch, self.seed, self.epoch, self.flip, self.on_corrupt,
                               list(self._skip_rows), self.image_size)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                             prefetch_factor=4 if self.num_workers else None)
        if self._position < len(self):
            for pieces in self._full_batches(loader):
                yield self._emit(pieces)
                if self._position == len(self):
                    return
            raise DataError(f"{self.directory}: rank {self.rank} ran out after {self._position} of {len(self)} "
                            f"micro-batches in epoch {self.epoch}; the shards hold fewer rows than their "
                            f"manifest says (run python -m data_prep.verify {self.directory})")

    def _full_batches(self, parts):
        """(part, rows) pieces of exactly one micro-batch each: full parts as they come, and the workers'
        last partial batches merged together."""
        tails: list[dict] = []
        for part in parts:
            self.corrupt_images += part["corrupt"]
            if len(part["label"]) == self.micro_batch:
                yield [(part, self.micro_batch)]
                continue
            tails.append(part)
            while sum(len(t["label"]) for t in tails) >= self.micro_batch:
                pieces, need = [], self.micro_batch
                while need:
                    first = tails[0]
                    n = min(need, len(first["label"]))
                    pieces.append((first, n))
                    need -= n
                    if n == len(first["label"]):
                        tails.pop(0)
                    else:
                        tails[0] = {**first, "image": first["image"][n:], "label": first["label"][n:]}
                yield pieces

    def _emit(self, pieces: list[tuple[dict, int]]) -> dict:
        """One micro-batch from (part, rows) pieces, counted as consumed before the trainer sees it."""
        for part, n in pieces:
            self._skip_rows[part["worker"]] += n
        self._position += 1
        images = torch.cat([part["image"][:n] for part, n in pieces])
        labels = torch.cat([part["label"][:n] for part, n in pieces])
        return {"image": normalize(images), "label": labels}
