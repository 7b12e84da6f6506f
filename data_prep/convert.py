"""The conversion engine shared by `data_prep.rec2arrow` and `data_prep.folder2arrow`.

A front-end describes its input as a `Source` (one entry per image, in source order). The engine reads it once,
sequentially, in chunks of many records (`Source.chunks`: parsed in bulk, images as Arrow arrays, no Python
object per record), and deals each chunk's rows to the shards of `ds_face.data.shards` that the plan puts them
in; all shards are written at once by a thread pool. On disk, in the output directory:

    plan.json                written first: sources (paths, sizes, mtimes) and the options that shape the shards
    data-*.arrow.partial     a shard being written; renamed to data-*.arrow once complete and fsynced
    .done/data-*.arrow.json  written after the rename: rows, bytes, sha256, first/last planned index
    property, *.bin, ...     carried files
    manifest.json            written last; then .done/ is removed

Re-running the same command on an output with a plan but no manifest resumes: shards whose sidecar matches
(rows, planned first/last index, size, sha256) are kept, the others rewritten (the pass skips the kept shards'
rows). All shards finish together at the end of the one pass, so a crash during it keeps only the plan; at
disk speed the pass is minutes even for WebFace42M (BENCHMARKS.md). Bad input is checked as far as
possible before anything is written; a bad record found during the pass stops it, and a conversion that
started from a new or empty directory then removes everything it wrote (fixing the input changes its mtime,
so those shards could never be resumed).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import resource
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from dataclasses import asdict, dataclass
from hashlib import sha256
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data_prep.recordio import RecordIOError
from ds_face import __version__
from ds_face.fileio import PARTIAL, fsync_path, write_atomic, write_json_atomic
from ds_face.data.shards import (
    MANIFEST, ROWS_PER_RECORD_BATCH, SCHEMA, Manifest, ShardInfo, read_manifest, rows_per_shard, sha256_of,
    shard_name,
)

PLAN = "plan.json"
DONE_DIR = ".done"
SHARD_FILE = re.compile(r"data-\d{5}-of-\d{5}\.arrow")

# Automatic shard count: shards of ~TARGET_SHARD_BYTES. The loader reads rows by random access from any shard,
# so the count no longer has to divide ranks x workers; per-shard costs (an fsync, a sidecar, small writes
# dealt over many files) are what make small shards slow (BENCHMARKS.md, "Conversion").
TARGET_SHARD_BYTES = 256 << 20
MIN_ROWS_PER_SHARD = 64
MAX_AUTO_SHARDS = 512  # past ~128 GB shards grow instead: every shard gets a batch from every chunk
# A chunk is dealt over all shards, so it grows with their number: ~1 MB per shard keeps record batches of
# ~200 images (smaller ones cost per-batch overhead), within 64-512 MB of memory (3 chunks in flight).
CHUNK_BYTES_PER_SHARD = 1 << 20
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 64 << 20, 512 << 20

JPEG_SOI = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class SourceError(ValueError):
    """Bad input. The message names the file and, when known, the record key and byte offset.
    One string argument, so that it pickles back from a worker process unchanged."""


class OutputError(ValueError):
    """The output directory is in a state the converter must not touch (foreign files, another conversion)."""


class Interrupted(Exception):
    """Ctrl-C in the main process; finished shards are kept for a resume."""


def source_error(path: str | os.PathLike, msg: str, key: int | None = None, offset: int | None = None) -> SourceError:
    """`<file>, key <k>, byte offset <o>: <msg>`, the same wording as `RecordIOError`."""
    return SourceError(str(RecordIOError(path, msg, record=None if key is None else f"key {key}", offset=offset)))


def image_problem(image: bytes) -> str | None:
    """Why `image` is not a JPEG or PNG file (checked by magic only: the loader decodes), or None."""
    if image.startswith(JPEG_SOI) or image.startswith(PNG_SIGNATURE):
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


# ---- small file helpers ----

def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (a crash can leave neither half-written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


# ---- planning ----

def choose_num_shards(num_samples: int, nbytes: int) -> int:
    """Shards of about TARGET_SHARD_BYTES, each of at least MIN_ROWS_PER_SHARD rows (one shard at least)."""
    by_bytes = min(-(-nbytes // TARGET_SHARD_BYTES), MAX_AUTO_SHARDS)
    return max(1, min(by_bytes, num_samples // MIN_ROWS_PER_SHARD))


def chunk_bytes_for(num_shards: int) -> int:
    return min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, num_shards * CHUNK_BYTES_PER_SHARD))


def describe_shard_count(num_shards: int, num_samples: int, nbytes: int) -> str:
    return f"{num_shards} shards of ~{num_samples / num_shards:.0f} rows (~{nbytes / num_shards / 1e6:.1f} MB)"


def shard_order(num_samples: int, order: str, seed: int | None) -> np.ndarray:
    """Source positions in shard order: shard i holds a contiguous run of this array. Shuffled: InsightFace .rec
    files are sorted by identity; every shard a uniform sample of the whole dataset mixes identities in any
    reader (ds_face's loader also mixes data.streams shards into every micro-batch)."""
    if order == "shuffled":
        return np.random.default_rng(seed).permutation(num_samples)
    return np.arange(num_samples)


def make_plan(source: Source, num_shards: int, order: str, seed: int | None) -> dict:
    return {"converter": f"{source.converter} {__version__}",
            "sources": source.files,
            "num_samples": len(source),
            "options": {"order": order, "seed": seed, "num_shards": num_shards},
            "carried": sorted(source.carried)}


def plan_difference(old: dict, new: dict) -> str | None:
    for key in ("converter", "sources", "num_samples", "options", "carried"):
        if old.get(key) != new[key]:
            if key == "sources":
                return _sources_difference(old.get(key) or [], new[key])
            return f"{key}: {json.dumps(old.get(key))} then, {json.dumps(new[key])} now"
    return None


def _sources_difference(old: list, new: list) -> str:
    old_by_file = {s.get("file"): s for s in old}
    for s in new:
        was = old_by_file.get(s["file"])
        if was is None:
            return f"source {s['file']} was not part of it"
        if was != s:
            changed = [k for k in s if was.get(k) != s[k]]
            return f"source {s['file']} changed since ({', '.join(changed)})"
    return f"sources: {[s.get('file') for s in old]} then, {[s['file'] for s in new]} now"


# ---- the output directory ----

def _is_owned(out: Path, name: str, carried: set[str]) -> bool:
    """Whether `name` in the output directory is something this converter writes."""
    base = name[:-len(PARTIAL)] if name.endswith(PARTIAL) else name
    if base in (PLAN, MANIFEST) or base in carried or SHARD_FILE.fullmatch(base):
        return True
    if name == DONE_DIR and (out / name).is_dir():
        return all(SHARD_FILE.fullmatch(re.sub(r"\.json(\.partial)?$", "", n)) for n in os.listdir(out / name))
    return False


def _carried_names(out: Path) -> set[str]:
    names: set[str] = set()
    for doc, key in ((read_json(out / PLAN), "carried"), (read_json(out / MANIFEST), "carried")):
        if isinstance(doc, dict) and isinstance(doc.get(key), list):
            names.update(n for n in doc[key] if isinstance(n, str) and "/" not in n)
    return names


def remove_owned(out: Path) -> None:
    """Remove what this converter wrote (the manifest first, so no reader sees it point at missing shards)."""
    carried = _carried_names(out)
    names = sorted(os.listdir(out), key=lambda n: n != MANIFEST)
    for name in names:
        if _is_owned(out, name, carried):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def inspect_output(out: Path, plan: dict, overwrite: bool) -> str:
    """'fresh', 'overwrite', 'resume' or 'finished'; refuses (OutputError) when the directory is not ours to use."""
    if not out.exists():
        return "fresh"
    if not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    names = sorted(os.listdir(out))
    if not names:
        return "fresh"
    if overwrite:
        carried = _carried_names(out)
        foreign = [n for n in names if not _is_owned(out, n, carried)]
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise OutputError(f"{out / foreign[0]}{more}: not written by data_prep; --overwrite removes only "
                              f"converter files, so move it away or choose another output directory")
        return "overwrite"
    old_plan = read_json(out / PLAN)
    if not isinstance(old_plan, dict):
        raise OutputError(f"{out}: not empty and holds no conversion plan ({PLAN}); choose an empty or new output "
                          f"directory, or use --overwrite to replace a previous conversion")
    difference = plan_difference(old_plan, plan)
    finished = isinstance(read_json(out / MANIFEST), dict)  # one torn by a power loss is rewritten on resume
    if difference:
        what = "a finished conversion" if finished else "an unfinished conversion"
        raise OutputError(f"{out}: holds {what} with other sources or options ({difference}); rerun with the "
                          f"original sources and options to {'keep' if finished else 'resume'} it, or use "
                          f"--overwrite to start over")
    return "finished" if finished else "resume"


# ---- writing shards ----

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
    """One shard being written: `data-*.arrow.partial`, an Arrow IPC stream, hashed as it is written.
    Appends come from one pool thread at a time."""

    def __init__(self, out: Path, name: str, rows: int, first: int, last: int):
        self.out, self.name, self.rows, self.first, self.last = out, name, rows, first, last
        self.partial = out / (name + PARTIAL)
        self.file = open(self.partial, "wb", buffering=0)  # Arrow hands over whole buffers: no need to buffer
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
        os.fsync(self.file.fileno())
        self.file.close()
        info = ShardInfo(self.name, self.rows, self.sink.nbytes, self.sink.digest.hexdigest())
        os.replace(self.partial, self.out / self.name)  # the directory is fsynced once, before the manifest
        # Not fsynced: a sidecar lost in a crash only costs rewriting its shard, and a resume checks the shard's
        # sha256 against it anyway.
        write_json_atomic(_sidecar(self.out, self.name),
                          {**asdict(info), "first_index": self.first, "last_index": self.last}, durable=False)
        return info

    def discard(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


def _sidecar(out: Path, name: str) -> Path:
    return out / DONE_DIR / f"{name}.json"


def _kept_shard(out: Path, name: str, rows: int, first: int, last: int) -> ShardInfo | None:
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


def prefetched(chunks: Iterator[Chunk], depth: int = 1) -> Iterator[Chunk]:
    """`chunks`, produced by a thread up to `depth` ahead: the next chunk is read and parsed while the pool
    writes this one. An exception in the thread is raised here, in order."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for chunk in chunks:
                queue.put(chunk)
                if stop.is_set():
                    return
            queue.put(done)
        except BaseException as e:
            queue.put(e)

    thread = threading.Thread(target=produce, name="data_prep-reader", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            with contextlib.suppress(Empty):
                queue.get(timeout=0.05)


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def mp_context():
    """For `data_prep.verify`'s process pool. forkserver: workers fork from a clean server process, not from a
    main process that may run threads (tqdm's monitor, Arrow's pools)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["data_prep.convert"])
    return ctx


# ---- the conversion ----

def convert(source: Source, out: str | os.PathLike, *, num_shards: int | None = None, order: str = "shuffled",
            seed: int = 0, workers: int | None = None, overwrite: bool = False,
            on_shard_done: Callable[[int], None] | None = None, chunk_bytes: int | None = None) -> Manifest:
    """Convert `source` into shards in `out`; returns the manifest (also when the output was already finished).
    `on_shard_done(n)` is called in the main thread after each finished shard (tests use it to crash);
    `chunk_bytes` overrides the size of the chunks the source is read in (tests use tiny ones)."""
    out = Path(out)
    n = len(source)
    if n == 0:
        raise SourceError(f"{source.files[0]['file']}: no images to convert")
    if num_shards is None:
        num_shards = choose_num_shards(n, source.nbytes)
    elif not 1 <= num_shards <= n:
        raise SourceError(f"--shards {num_shards}: must be between 1 and the number of images ({n})")
    if order not in ("shuffled", "source"):
        raise SourceError(f"--order {order}: expected 'shuffled' or 'source'")
    seed = seed if order == "shuffled" else None
    plan = make_plan(source, num_shards, order, seed)
    mode = inspect_output(out, plan, overwrite)
    if mode == "finished":
        print(f"{out}: already converted ({n} samples in {num_shards} shards); nothing to do "
              f"(--overwrite converts again)")
        return read_manifest(out)

    print(f"{source.converter}: {n} images, {source.num_classes} classes -> {out}")
    print(describe_shard_count(num_shards, n, source.nbytes))
    created = not out.exists()
    if mode == "overwrite":
        print(f"--overwrite: removing the previous conversion in {out}")
        remove_owned(out)
    if mode == "resume":
        print(f"resuming the unfinished conversion in {out} (its {PLAN} matches)")
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE_DIR).mkdir(exist_ok=True)
    for name in os.listdir(out):  # a crash mid-write leaves partials; they are never resumed, only redone
        if name.endswith(PARTIAL):
            (out / name).unlink()
    if mode != "resume":
        write_json_atomic(out / PLAN, plan)
    try:
        shards = _write_shards(source, out, num_shards, shard_order(n, order, seed), workers or default_workers(),
                               on_shard_done, chunk_bytes or chunk_bytes_for(num_shards))
    except SourceError:
        if mode != "resume":  # fixing the input changes its mtime, so these shards could never be resumed
            remove_owned(out)
            if created and not any(out.iterdir()):
                out.rmdir()
        raise
    for name, what in source.carried.items():
        write_atomic(out / name, what if isinstance(what, bytes) else Path(what).read_bytes())
    fsync_path(out)  # every shard rename is on disk before the manifest names them
    manifest = Manifest(num_samples=n, num_classes=source.num_classes, shards=shards, image_size=source.image_size,
                        sources=[{"file": f["file"], "bytes": f["bytes"]} for f in source.files],
                        carried=sorted(source.carried), converter=plan["converter"],
                        options={"order": order, "seed": seed})
    manifest.write(out)  # atomic and durable
    shutil.rmtree(out / DONE_DIR)  # the manifest now holds what the sidecars held
    return manifest


def _write_shards(source: Source, out: Path, num_shards: int, order: np.ndarray, workers: int,
                  on_shard_done: Callable[[int], None] | None, chunk_bytes: int) -> list[ShardInfo]:
    """One sequential pass over the source: each chunk's rows are dealt to the shards the plan puts them in
    (shard i holds the source positions order[bounds[i]:bounds[i+1]], in source order), every shard open at
    once. Threads, not processes: the work (reading, Arrow copies, sha256, writes) releases the GIL, and no
    image bytes cross a process boundary."""
    rows = rows_per_shard(len(source), num_shards)
    bounds = np.concatenate([[0], np.cumsum(rows)])
    shard_of = np.empty(len(source), dtype=np.int64)
    shard_of[order] = np.repeat(np.arange(num_shards), rows)
    plans = []  # (name, rows, planned first index, planned last index): the identity a sidecar must match
    for i in range(num_shards):
        first, last = (int(source.indexes[order[j]]) for j in (bounds[i], bounds[i + 1] - 1))
        plans.append((shard_name(i, num_shards), rows[i], first, last))
    _raise_open_file_limit(num_shards + 64)

    infos: dict[int, ShardInfo] = {}
    writers: dict[int, ShardWriter] = {}
    running: list = []  # the pool's jobs in flight
    start = time.perf_counter()
    bar = tqdm(total=len(source), unit="rec", unit_scale=True, file=sys.stderr, mininterval=0.5, smoothing=0.1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="data_prep") as pool:
        try:
            for i, kept in enumerate(pool.map(lambda p: _kept_shard(out, *p), plans)):
                if kept is not None:
                    infos[i] = kept
            if infos:
                bar.update(sum(infos[i].rows for i in infos))
            new = [i for i in range(num_shards) if i not in infos]
            for i in new:
                writers[i] = ShardWriter(out, *plans[i])
            wanted = np.isin(shard_of, list(writers))
            for chunk in prefetched(source.chunks(wanted, chunk_bytes)):
                shards = shard_of[chunk.positions]
                by_shard = np.argsort(shards, kind="stable")  # each shard's rows, in source order
                cuts = np.flatnonzero(np.diff(shards[by_shard])) + 1
                running = [pool.submit(_append, writers[int(shards[rows_i[0]])], chunk, rows_i)
                           for rows_i in np.split(by_shard, cuts)]
                for job in running:  # all of this chunk is written before the next: appends stay in order
                    job.result()
                bar.update(len(chunk.positions))
            finishing = {pool.submit(writer.finish): i for i, writer in writers.items()}
            running = list(finishing)
            for job in as_completed(finishing):
                infos[finishing[job]] = job.result()
                writers.pop(finishing[job])
                if on_shard_done:
                    on_shard_done(len(infos))
        except BaseException as e:
            for job in running:
                job.cancel()
            wait(running)  # no thread is still writing a file that is about to be removed
            for writer in writers.values():  # unfinished shards never stay behind half-written
                writer.discard()
            bar.close()
            if isinstance(e, KeyboardInterrupt):
                raise Interrupted(f"interrupted: {len(infos)} of {num_shards} shards are finished in {out}; rerun "
                                  f"the same command to resume") from None
            if isinstance(e, RecordIOError):
                raise SourceError(str(e)) from None
            raise
    bar.close()
    seconds = time.perf_counter() - start
    new_rows = sum(rows[i] for i in new)
    new_bytes = sum(infos[i].bytes for i in new)
    print(f"wrote {new_rows:,} records ({new_bytes / 1e6:,.1f} MB) into {len(new)} shards in {seconds:.1f} s: "
          f"{new_rows / seconds:,.0f} records/s, {new_bytes / 1e6 / seconds:,.1f} MB/s ({workers} threads)"
          + (f"; kept {num_shards - len(new)} finished shards" if len(new) < num_shards else ""))
    return [infos[i] for i in range(num_shards)]


def _append(writer: ShardWriter, chunk: Chunk, rows: np.ndarray) -> None:
    # Batch by batch: a batch's images (~5 MB) are gathered, hashed and written while they are still in the
    # CPU cache, instead of one gather per shard and chunk (up to hundreds of MB) streamed through memory thrice.
    for start in range(0, len(rows), ROWS_PER_RECORD_BATCH):
        batch = rows[start:start + ROWS_PER_RECORD_BATCH]
        writer.append(chunk.images(batch), chunk.labels[batch], chunk.indexes[batch])
    writer.start_writeback()


def _raise_open_file_limit(needed: int) -> None:
    """Every shard is open at once; raise the soft limit towards the hard one when it is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(needed, hard),
                                                    hard))


# ---- the command line, shared by the front-ends ----

def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output directory (created; must be empty, a resumable conversion of the same "
                                    "sources, or --overwrite)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="threads that copy, hash and write shards (default: min(8, CPUs))")
    parser.add_argument("--shards", type=int, default=None,
                        help="number of shards (default: shards of ~256 MB, each of at least 64 rows)")
    parser.add_argument("--order", choices=("shuffled", "source"), default="shuffled",
                        help="shuffled (default): every shard a uniform sample of identities; source: source order, "
                             "sequential reads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled order (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous conversion in OUT (removes only files the converter writes)")


def run_cli(make_source: Callable[[], Source], args: argparse.Namespace,
            on_shard_done: Callable[[int], None] | None = None) -> int:
    """0 done, 2 bad input or unusable output directory, 1 another failure (resumable), 130 interrupted."""
    try:
        if args.workers < 1:
            raise SourceError(f"--workers {args.workers}: must be at least 1")
        convert(make_source(), args.out, num_shards=args.shards, order=args.order, seed=args.seed,
                workers=args.workers, overwrite=args.overwrite, on_shard_done=on_shard_done)
    except (SourceError, RecordIOError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 130
    except RuntimeError as e:  # the message says what is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: finished shards stay for a resume
        print(f"error: {e}; finished shards are kept: rerun the same command to resume", file=sys.stderr)
        return 1
    return 0
