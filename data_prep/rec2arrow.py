"""Convert an InsightFace / MXNet RecordIO dataset (train.rec, train.idx, property) into Arrow shards.

    python -m data_prep.rec2arrow /data/ms1m-retinaface-t1 /data/ms1m-arrow --workers 8

InsightFace layout (record 0 a header, identity records after the images): only the image records are converted;
plain im2rec layout: every record. `index` is the record's .idx key, `label` its (integral) float label, `image`
the JPEG bytes untouched. `property` and `*.bin` (validation sets) beside the .rec are carried over.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np

from data_prep.convert import Source, SourceError, add_common_args, image_problem, run_cli, source_error
from data_prep.recordio import RecordReader, detect_layout, read_idx, read_property


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

    def items(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.indexes[positions], self.offsets[positions]


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
    idx = read_idx(idx_path)
    reader = RecordReader(rec)
    if idx:  # the record that ends the file: a truncated file fails here, before anything is written
        last_key, last_offset = max(idx, key=lambda pair: pair[1])
        reader.read_at(last_offset, last_key)
    layout = detect_layout(reader, idx)
    if not layout.image_keys:
        raise SourceError(f"{idx_path}: no image records ({len(idx)} keys in the .idx, {layout.style} layout)")
    if num_images is not None and num_images != len(layout.image_keys):
        raise SourceError(f"{prop}, line 2: says {num_images} images, but {idx_path} has {len(layout.image_keys)} "
                          f"image keys")
    all_keys, all_offsets = np.array(idx, dtype=np.int64).reshape(-1, 2).T
    mask = np.isin(all_keys, np.asarray(layout.image_keys, dtype=np.int64))
    keys, offsets = all_keys[mask], all_offsets[mask]
    _check_offsets(reader, keys, offsets)
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
                     reader=RecRows(str(rec), num_classes), offsets=offsets)


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
