"""Check a converted dataset against its manifest, and with --source against the data it was converted from.

    python -m data_prep.verify /data/ms1m-arrow [--workers 8] [--source /data/ms1m-retinaface-t1]
    python -m data_prep.verify s3://bucket/ms1m-arrow

A dataset in object storage is read through its client (`ds_face.data.store`; credentials and endpoint from the
client's environment): each shard is fetched whole into a temporary local file (size and sha256 checked as it
arrives, up to --workers at a time), checked as a local one, and deleted; with --source it is fetched again.

Every shard: what the trainer checks before a run (`ds_face.data.shards.open_shard`: present, size as in the
manifest, exactly the shard schema, valid record batches without nulls, labels in [0, num_classes)), and the
sha256, record batches of at most ROWS_PER_RECORD_BATCH rows, the planned row count, every image a JPEG or a
PNG by its magic bytes. All shards: total rows, every
`index` once. --source: every source image exactly once, image bytes and labels identical.
Exit status 0 when all holds, 1 naming the first bad shard and row otherwise, 2 when the source cannot be read.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_prep.convert import mp_context
from data_prep.recordio import RecordIOError
from data_prep.source import Source, SourceError
from ds_face.data.shards import (
    ROWS_PER_RECORD_BATCH, Manifest, ShardError, ShardInfo, open_shard, read_manifest, rows_per_shard, sha256_of,
)
from ds_face.data.store import Store, StoreError, is_remote
from ds_face.images import ImageFormatError, image_format
from ds_face.runtime.cpus import worker_processes


def _read_shard(directory: str, info: ShardInfo, num_classes: int) -> pa.Table:
    """The shard through the trainer's own reader (`ds_face.data.shards.open_shard`: size, schema, valid record
    batches, no nulls, row count, labels in [0, num_classes)), plus what only data_prep's writer promises."""
    table = open_shard(Path(directory) / info.file, info, num_classes, where=info.file)
    for n, batch in enumerate(table.to_batches()):
        if batch.num_rows > ROWS_PER_RECORD_BATCH:
            raise ShardError(f"{info.file}: record batch {n} has {batch.num_rows} rows, more than "
                             f"{ROWS_PER_RECORD_BATCH}")
    return table


def check_shard(directory: str, info: ShardInfo, planned_rows: int, num_classes: int) -> tuple[np.ndarray, ...]:
    """(labels, indexes) of one shard after checking it against the manifest; ShardError names what is wrong."""
    path = Path(directory) / info.file
    if not path.is_file():
        raise ShardError(f"{info.file}: missing")
    if path.stat().st_size != info.bytes:
        raise ShardError(f"{info.file}: {path.stat().st_size} bytes, the manifest says {info.bytes}")
    digest = sha256_of(path)
    if digest != info.sha256:
        raise ShardError(f"{info.file}: sha256 {digest}, the manifest says {info.sha256} (corrupt or replaced)")
    table = _read_shard(directory, info, num_classes)
    if table.num_rows != planned_rows:  # the manifest's count (open_shard checked it), not the plan's
        raise ShardError(f"{info.file}: {table.num_rows} rows, as the manifest says, but the shard plan "
                         f"(rows_per_shard) says {planned_rows}")
    labels, indexes = table.column("label").to_numpy(), table.column("index").to_numpy()
    for r, head in enumerate(pc.binary_slice(table.column("image"), 0, 8).to_pylist()):  # the trainer refuses
        try:  # any other format (ds_face.images): every image's magic bytes, which only verify reads
            image_format(head)
        except ImageFormatError as err:
            raise ShardError(f"{info.file}, row {r} (index {indexes[r]}): {err}") from None
    return labels, indexes


def compare_shard(directory: str, info: ShardInfo, num_classes: int, reader: Any, items: Any) -> None:
    """Every row of the shard equals the source image it came from (`items`: the source rows, in shard order)."""
    table = _read_shard(directory, info, num_classes)
    name = info.file
    images, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
    try:
        for r, (image, label, index) in enumerate(reader.rows(items)):
            if labels[r] != label:
                raise ShardError(f"{name}, row {r} (index {index}): label {labels[r]}, the source says {label}")
            if images[r] != image:
                raise ShardError(f"{name}, row {r} (index {index}): image bytes differ from the source "
                                 f"({len(images[r])} vs {len(image)} bytes)")
    except RecordIOError as e:  # pickles back as a plain message
        raise SourceError(str(e)) from None


def open_source(manifest: Manifest, src: str, prefix: str) -> Source:
    if manifest.converter.startswith("data_prep.folder2arrow"):
        from data_prep.folder2arrow import open_folder_source
        return open_folder_source(src)
    from data_prep.rec2arrow import open_rec_source
    return open_rec_source(src, prefix)


def _where(manifest: Manifest, position: int) -> str:
    """'<shard>, row <r>' of a row given by its position in all shards, in manifest order."""
    ends = np.cumsum([s.rows for s in manifest.shards])
    i = int(np.searchsorted(ends, position, side="right"))
    return f"{manifest.shards[i].file}, row {position - (ends[i] - manifest.shards[i].rows)}"


@contextlib.contextmanager
def _local_copy(directory: str, store: Store | None, info: ShardInfo):
    """A local directory holding the shard: `directory` itself, or a temporary one the shard is fetched into
    from the store (its size and sha256 checked against the manifest on the way), removed afterwards."""
    if store is None:
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="ds_face-verify-") as temporary:
        with open(Path(temporary) / info.file, "xb") as out:
            try:
                store.fetch(info.file, out, info.bytes, info.sha256)
            except StoreError as err:
                raise ShardError(str(err)) from None
        yield temporary


def _each_shard(pool, threads, directory: str, store: Store | None, task, manifest: Manifest, *columns) -> list:
    """`task(local directory, shard, *column values)` for every shard in the process pool, results in manifest
    order; for a store each shard is fetched first by one of `threads`, so at most that many are on local disk."""
    def one(info: ShardInfo, *args):
        with _local_copy(directory, store, info) as local:
            try:
                return pool.submit(task, local, info, *args).result()
            except ShardError as err:  # "<shard>: ..." of a fetched copy: named by its URL instead
                if store is None or not str(err).startswith(info.file):
                    raise
                raise ShardError(store.where(info.file) + str(err)[len(info.file):]) from None
    return list(threads.map(one, manifest.shards, *columns))


def verify(directory: str, workers: int, source_dir: str | None = None, prefix: str = "train") -> str:
    """The summary when the dataset checks out; raises ShardError (or SourceError) at the first problem."""
    manifest = read_manifest(directory)
    planned = rows_per_shard(manifest.num_samples, len(manifest.shards))
    source = open_source(manifest, source_dir, prefix) if source_dir else None
    store = Store(directory) if is_remote(directory) else None
    workers = min(workers, len(manifest.shards))
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp_context()) as processes, \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as threads:
        pool = (processes, threads, directory, store)
        results = _each_shard(*pool, check_shard, manifest, planned, [manifest.num_classes] * len(planned))
        labels = np.concatenate([r[0] for r in results])
        indexes = np.concatenate([r[1] for r in results])
        order = np.argsort(indexes, kind="stable")
        repeated = np.flatnonzero(np.diff(indexes[order]) == 0)
        if len(repeated):
            a, b = order[repeated[0]], order[repeated[0] + 1]
            raise ShardError(f"{_where(manifest, b)}: index {indexes[b]} also in {_where(manifest, a)}")
        if source is not None:
            _compare_with_source(pool, manifest, source, indexes, order)
    counts = np.bincount(labels, minlength=manifest.num_classes)
    size = sum(s.bytes for s in manifest.shards)
    lines = [f"{directory}: OK",
             f"  samples {manifest.num_samples:,} in {len(manifest.shards)} shards ({size / 1e6:,.1f} MB), "
             f"classes {manifest.num_classes:,}",
             f"  images per class: min {counts.min()}, median {np.median(counts):g}, max {counts.max()}"
             + (f" ({np.sum(counts == 0)} classes have no image)" if counts.min() == 0 else ""),
             f"  converter {manifest.converter}, options {manifest.options}"]
    if source is not None:
        lines.append(f"  source {source_dir}: every image once, bytes and labels identical")
    return "\n".join(lines)


def _compare_with_source(pool: tuple, manifest: Manifest, source: Source, indexes: np.ndarray,
                         order: np.ndarray) -> None:
    src_order = np.argsort(source.indexes, kind="stable")
    src_sorted = source.indexes[src_order]
    missing = np.setdiff1d(src_sorted, indexes)
    if len(missing):
        raise ShardError(f"source image {missing[0]} ({source.files[0]['file']}) is in no shard "
                         f"({len(missing)} missing)")
    found = np.searchsorted(src_sorted, indexes).clip(max=len(src_sorted) - 1)
    extra = np.flatnonzero(src_sorted[found] != indexes)
    if len(extra):
        raise ShardError(f"{_where(manifest, int(extra[0]))}: index {indexes[extra[0]]} is not an image of the source")
    positions = src_order[found]  # source position of every row, in shard order
    starts = np.concatenate([[0], np.cumsum([s.rows for s in manifest.shards])])
    tasks = [source.items(positions[starts[i]:starts[i + 1]]) for i in range(len(manifest.shards))]
    _each_shard(*pool, compare_shard, manifest, [manifest.num_classes] * len(tasks), [source.reader] * len(tasks),
                tasks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="a directory (or an object-store URL, s3://bucket/prefix) written by "
                                    "data_prep.rec2arrow or data_prep.folder2arrow")
    parser.add_argument("--workers", type=int, default=worker_processes(), help="processes (default: min(8, CPUs))")
    parser.add_argument("--source", help="also compare with this source (what rec2arrow/folder2arrow read)")
    parser.add_argument("--prefix", default="train", help="file name prefix of the .rec/.idx (default: train)")
    args = parser.parse_args(argv)
    try:
        print(verify(args.dir, max(1, args.workers), args.source, args.prefix))
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (SourceError, RecordIOError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
