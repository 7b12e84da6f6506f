"""One shard being written (an Arrow IPC stream, hashed as it is written, fsynced, renamed when complete, then
its sidecar), and the check that lets a resume keep a finished shard."""
from __future__ import annotations

import os
from dataclasses import asdict
from hashlib import sha256
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.plan import DONE_DIR, read_json
from ds_face.data.shards import SCHEMA, ShardInfo, sha256_of
from ds_face.fileio import AtomicFile, write_json_atomic


class _HashingFile:
    """A write-only file that hashes what passes through, so a shard is never read back for its checksum.
    The Arrow stream writer hands it its buffers without a copy; hashing and writing release the GIL."""

    def __init__(self, f):
        self.f, self.digest, self.nbytes, self.closed = f, sha256(), 0, False

    def write(self, data) -> int:
        self.digest.update(data)
        self.nbytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:  # the Arrow writer closes its sink; the shard still needs the file for fsync
        self.closed = True


class ShardWriter:
    """One shard being written: a fresh `data-*.arrow.<random>.partial` (ds_face.fileio: created exclusively, no
    link followed), an Arrow IPC stream, hashed as it is written. Appends come from one pool thread at a time."""

    def __init__(self, out: Path, name: str, rows: int, first: int, last: int):
        self.out, self.name, self.rows, self.first, self.last = out, name, rows, first, last
        # fsynced and renamed into place by finish(); the directory is fsynced once, before the manifest
        self.aside = AtomicFile(out / name, durable=True, sync_dir=False)
        self.file = self.aside.file
        self.sink = _HashingFile(self.file)
        self.writer = pa.ipc.new_stream(self.sink, SCHEMA)
        self.written = 0

    def append(self, images: pa.Array, labels: np.ndarray, indexes: np.ndarray) -> None:
        """One record batch (at most ROWS_PER_RECORD_BATCH rows, the batch size `datasets` streams)."""
        self.writer.write_batch(pa.record_batch(
            [images, pa.array(labels, pa.int64()), pa.array(indexes, pa.int64())], schema=SCHEMA))
        self.written += len(images)

    def start_writeback(self) -> None:
        """Have the kernel start writing what this shard has so far (asynchronously): the disk writes while the
        pass goes on, instead of all at once in the final fsync. DONTNEED also lets those pages go once they
        are clean, so a conversion bigger than memory does not push everything else out of the page cache."""
        os.posix_fadvise(self.file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def finish(self) -> ShardInfo:
        """EOS, fsync, rename to the final name, then the sidecar that lets a resume keep this shard."""
        if self.written != self.rows:
            raise RuntimeError(f"{self.name}: wrote {self.written} rows, planned {self.rows}")
        self.writer.close()  # writes the end-of-stream marker
        info = ShardInfo(self.name, self.rows, self.sink.nbytes, self.sink.digest.hexdigest())
        self.aside.commit()  # fsync, rename to the final name
        # Not fsynced: a sidecar lost in a crash only costs rewriting its shard, and a resume checks the shard's
        # sha256 against it anyway.
        write_json_atomic(_sidecar(self.out, self.name),
                          {**asdict(info), "first_index": self.first, "last_index": self.last}, durable=False)
        return info

    def discard(self) -> None:
        self.aside.discard()


def _sidecar(out: Path, name: str) -> Path:
    return out / DONE_DIR / f"{name}.json"


def kept_shard(out: Path, name: str, rows: int, first: int, last: int) -> ShardInfo | None:
    """The finished shard `name` if its sidecar matches the plan and the file its sidecar, else None."""
    meta = read_json(_sidecar(out, name))
    path = out / name
    if not isinstance(meta, dict) or not path.is_file():
        return None
    if (meta.get("rows"), meta.get("first_index"), meta.get("last_index")) != (rows, first, last):
        return None
    if meta.get("bytes") != path.stat().st_size or meta.get("sha256") != sha256_of(path):
        return None
    return ShardInfo(name, rows, meta["bytes"], meta["sha256"])
