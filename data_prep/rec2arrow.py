"""Convert an InsightFace / MXNet RecordIO dataset (train.rec, train.idx, property) into Arrow shards.

    python -m data_prep.rec2arrow /data/ms1m-retinaface-t1 /data/ms1m-arrow --workers 8

InsightFace layout (record 0 a header, identity records after the images): only the image records are converted;
plain im2rec layout: every record. `index` is the record's .idx key, `label` its (integral) float label, `image`
the JPEG bytes untouched. `property` and `*.bin` (validation sets) beside the .rec are carried over.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from data_prep.convert import add_common_args, run_cli
from data_prep.recordio import RecordReader, detect_layout, parse_image_records, read_idx_arrays, read_property
from data_prep.source import Chunk, Source, SourceError, image_problem, source_error
from ds_face.data.shards import MAX_IMAGE_BYTES

_JPEG_SOI_WORD = 0xFFD8FF  # b"\xff\xd8\xff" as the low 3 bytes of a little-endian uint32
_PNG_WORDS = np.frombuffer(b"\x89PNG\r\n\x1a\n", "<u4")


@lru_cache(maxsize=4)
def _open_reader(path: str) -> RecordReader:  # one per worker process, reused by all its shards
    return RecordReader(path)


def read_rec_image(reader: RecordReader, key: int, offset: int, num_classes: int) -> tuple[bytes, int]:
    """(image bytes, label) of the image record at `offset`, checked: framing, an integral label in
    [0, num_classes), a JPEG or PNG payload."""
    _, labels, _, _, image = reader.read_image_record(offset, key)
    value = labels[0]  # flag 0: the header's float; flag > 0: the first float of the label array
    if not (math.isfinite(value) and value == int(value)):
        raise source_error(reader.path, f"label {value!r} is not an integer", key, offset)
    label = int(value)
    if not 0 <= label < num_classes:
        raise source_error(reader.path, f"label {label} is outside [0, {num_classes}) (num_classes from property)",
                           key, offset)
    if problem := image_problem(image):
        raise source_error(reader.path, problem, key, offset)
    return image, label


@dataclass(frozen=True)
class RecRows:
    """The worker side of a RecSource: reads (key, offset) items."""
    path: str
    num_classes: int

    def rows(self, items: tuple[np.ndarray, np.ndarray]) -> Iterator[tuple[bytes, int, int]]:
        reader = _open_reader(self.path)
        for key, offset in zip(*(a.tolist() for a in items)):
            image, label = read_rec_image(reader, key, offset, self.num_classes)
            yield image, label, key


@dataclass
class RecSource(Source):
    offsets: np.ndarray = None  # int64, beside `indexes` (the image keys)
    limits: np.ndarray = None  # int64: where each image record must end (the next .idx offset, or the file size)

    def items(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.indexes[positions], self.offsets[positions]

    def chunks(self, wanted: np.ndarray, chunk_bytes: int) -> Iterator[Chunk]:
        """The wanted image records in file order, about `chunk_bytes` of .rec at a time, read sequentially."""
        positions = np.flatnonzero(wanted)
        positions = positions[np.argsort(self.offsets[positions], kind="stable")]
        offsets, limits = self.offsets[positions], self.limits[positions]  # both ascending
        path = self.reader.path
        buffers = [np.zeros(0, dtype=np.uint8)] * 3  # reused: fresh 64+ MB arrays cost page faults every chunk
        with open(path, "rb", buffering=0) as f, RecordReader(path) as slow_reader:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger kernel readahead
            start, n = 0, 0
            while start < len(positions):
                base = int(offsets[start])
                stop = max(start + 1, int(np.searchsorted(limits, base + chunk_bytes, side="right")))
                span = min(int(limits[stop - 1]), base + max(chunk_bytes, 1 << 20)) - base
                size = -(-span // 4) * 4  # whole uint32 words for the parser
                # Three chunks are alive at most: the one the engine writes, one queued (`prefetched`), and
                # this one; the engine is done with chunk n - 3 before it takes chunk n - 1 from the queue.
                if len(buffers[n % 3]) < size:
                    buffers[n % 3] = np.empty(size, dtype=np.uint8)
                buf = buffers[n % 3][:size]
                buf[-4:] = 0
                _read_exactly(f, base, memoryview(buf)[:span], path)
                yield self._chunk(buf, base, positions[start:stop], offsets[start:stop] - base,
                                  np.minimum(limits[start:stop] - base, span), slow_reader)
                start, n = stop, n + 1

    def _chunk(self, buf: np.ndarray, base: int, positions: np.ndarray, starts: np.ndarray, limits: np.ndarray,
               slow_reader: RecordReader) -> Chunk:
        """Parse and check a chunk in bulk; the records the fast path cannot take (multi-part, or anything
        wrong) are read one by one through `read_rec_image`, which raises the error that names the record."""
        recs = parse_image_records(buf, starts, limits)
        label, length = recs.label, recs.image_len
        words = buf.view("<u4")
        head = np.minimum(recs.image_start // 4, max(len(words) - 2, 0))  # clipped: only `ok` rows are used
        jpeg = (length >= 3) & (words[head] & 0xFFFFFF == _JPEG_SOI_WORD)
        png = (length >= 8) & (words[head] == _PNG_WORDS[0]) & (words[head + 1] == _PNG_WORDS[1])
        with np.errstate(invalid="ignore"):
            ok = (recs.ok & np.isfinite(label) & (label == np.floor(label)) & (label >= 0)
                  & (label < self.num_classes) & (jpeg | png) & (length <= MAX_IMAGE_BYTES))
        labels = np.where(ok, label, 0).astype(np.int64)
        which = np.zeros(len(positions), dtype=np.int64)  # data buffer 0: the chunk; 1: the slow path's images
        start, length = recs.image_start.copy(), length.copy()
        slow_images = []
        slow_at = 0
        for j in np.flatnonzero(~ok).tolist():  # rare: multi-part records, or the first bad record
            key = int(self.indexes[positions[j]])
            image, labels[j] = read_rec_image(slow_reader, key, base + int(starts[j]), self.num_classes)
            which[j], start[j], length[j] = 1, slow_at, len(image)
            slow_images.append(image)
            slow_at += len(image)
        data = [buf, np.frombuffer(b"".join(slow_images) + bytes(12), dtype=np.uint8)]
        views = binary_views(data, which, start, length)
        arrow_data = [pa.py_buffer(d) for d in data]

        def images(rows: np.ndarray) -> pa.Array:  # the gather (one memcpy per image) happens in Arrow's cast
            subset = np.ascontiguousarray(views[rows])
            return pa.Array.from_buffers(pa.binary_view(), len(rows), [None, pa.py_buffer(subset), *arrow_data]
                                         ).cast(pa.binary())

        return Chunk(positions=positions, labels=labels, indexes=self.indexes[positions], images=images)


def binary_views(data: list[np.ndarray], which: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Arrow binary-view structs (16 bytes per value) for values `data[which][start:start + length]`: length,
    then the value itself when it has at most 12 bytes, else its first 4 bytes, buffer index and offset.
    Built in numpy, so a chunk's image column costs no Python object per image."""
    views = np.zeros((len(which), 16), dtype=np.uint8)
    words = views.view("<i4")
    words[:, 0] = length
    for b, buffer in enumerate(data):
        rows = np.flatnonzero(which == b)
        take = np.minimum(start[rows, None] + np.arange(12), len(buffer) - 1)
        head = buffer[take]
        head[np.arange(12) >= length[rows, None]] = 0  # inline values are zero-padded
        views[rows, 4:] = head
    long = length > 12
    words[long, 2] = which[long]
    words[long, 3] = start[long]
    return views


def _read_exactly(f, offset: int, into: memoryview, path: str) -> None:
    f.seek(offset)
    got = 0
    while got < len(into):
        n = f.readinto(into[got:])
        if not n:
            raise source_error(path, f"file ended after {offset + got} bytes while reading a chunk (truncated "
                                     f"while converting?)", offset=offset + got)
        got += n


def rec_paths(src: str | Path, prefix: str = "train") -> tuple[Path, Path, Path]:
    """(rec, idx, property) for a directory holding PREFIX.rec, or for a path to a .rec file."""
    src = Path(src)
    if src.suffix == ".rec" and not src.is_dir():
        return src, src.with_suffix(".idx"), src.parent / "property"
    if not src.is_dir():
        raise SourceError(f"{src}: not found (expected a directory with {prefix}.rec, {prefix}.idx and property, "
                          f"or a .rec file)")
    return src / f"{prefix}.rec", src / f"{prefix}.idx", src / "property"


def open_rec_source(src: str | Path, prefix: str = "train") -> RecSource:
    """Everything that can be checked without reading the whole .rec: the three files, the property, the .idx,
    the layout, every image offset (in the file, 4-aligned, no two keys on one record), the first and last image
    record. Each record is checked in full by the worker that converts it."""
    rec, idx_path, prop = rec_paths(src, prefix)
    for path, what in ((rec, "record file"), (idx_path, "index file"), (prop, "property file")):
        if not path.is_file():
            raise SourceError(f"{path}: {what} not found")
    num_classes, height, width, num_images = read_property(prop)
    all_keys, all_offsets = read_idx_arrays(idx_path)
    reader = RecordReader(rec)
    if len(all_keys):  # the record that ends the file: a truncated file fails here, before anything is written
        last = int(np.argmax(all_offsets))
        reader.read_at(int(all_offsets[last]), int(all_keys[last]))
    layout = detect_layout(reader, all_keys, all_offsets)
    if not len(layout.image_keys):
        raise SourceError(f"{idx_path}: no image records ({len(all_keys)} keys in the .idx, {layout.style} layout)")
    if num_images is not None and num_images != len(layout.image_keys):
        raise SourceError(f"{prop}, line 2: says {num_images} images, but {idx_path} has {len(layout.image_keys)} "
                          f"image keys")
    mask = np.isin(all_keys, layout.image_keys)
    keys, offsets = all_keys[mask], all_offsets[mask]
    _check_offsets(reader, keys, offsets)
    record_starts = np.append(np.unique(all_offsets), reader.size)  # every record, header and identities too
    limits = record_starts[np.searchsorted(record_starts, offsets, side="right")]
    for j in (0, -1):
        read_rec_image(reader, int(keys[j]), int(offsets[j]), num_classes)
    directory = rec.parent
    carried = {p.name: p for p in sorted(directory.glob("*.bin")) if p.is_file()}
    carried["property"] = prop
    files = [{"file": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
             for p in (rec, idx_path, prop)]
    reader.close()
    return RecSource(converter="data_prep.rec2arrow", indexes=keys, num_classes=num_classes,
                     image_size=[height, width], files=files, carried=carried, nbytes=files[0]["bytes"],
                     reader=RecRows(str(rec), num_classes), offsets=offsets, limits=limits)


def _check_offsets(reader: RecordReader, keys: np.ndarray, offsets: np.ndarray) -> None:
    bad = np.flatnonzero((offsets >= reader.size) | (offsets % 4 != 0))
    if len(bad):
        reader.read_at(int(offsets[bad[0]]), int(keys[bad[0]]))  # raises, naming the key and the offset
    order = np.argsort(offsets, kind="stable")
    same = np.flatnonzero(np.diff(offsets[order]) == 0)
    if len(same):
        a, b = order[same[0]], order[same[0] + 1]
        raise source_error(reader.path, f"keys {keys[a]} and {keys[b]} point to the same record", int(keys[b]),
                           int(offsets[b]))


def main(argv: list[str] | None = None, on_shard_done=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.rec2arrow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="directory with PREFIX.rec, PREFIX.idx and property, or a .rec file")
    add_common_args(parser)
    parser.add_argument("--prefix", default="train", help="file name prefix of the .rec/.idx (default: train)")
    args = parser.parse_args(argv)
    return run_cli(lambda: open_rec_source(args.src, args.prefix), args, on_shard_done)


if __name__ == "__main__":
    sys.exit(main())
