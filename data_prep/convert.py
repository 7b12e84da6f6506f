"""The conversion engine shared by `data_prep.rec2arrow` and `data_prep.folder2arrow`.

A front-end describes its input as a `Source` (one entry per image, in source order) and the engine writes the
shards of `ds_face.data.shards` with a process pool, one task per shard. On disk, in the output directory:

    plan.json                written first: sources (paths, sizes, mtimes) and the options that shape the shards
    data-*.arrow.partial     a shard being written; renamed to data-*.arrow once complete and fsynced
    .done/data-*.arrow.json  written after the rename: rows, bytes, sha256, first/last planned index
    property, *.bin, ...     carried files
    manifest.json            written last; then .done/ is removed

Re-running the same command on an output with a plan but no manifest resumes: shards whose sidecar matches
(rows, planned first/last index, size, sha256) are kept, the others rewritten. Bad input is checked as far as
possible before anything is written; a bad record found by a worker stops all workers, and a conversion that
started from a new or empty directory then removes everything it wrote (fixing the input changes its mtime,
so those shards could never be resumed).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from hashlib import sha256
from pathlib import Path
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

# Automatic shard counts: 960 (many divisors: `datasets` can deal whole shards evenly to ranks, should a reader
# use it that way; ds_face's own loader reads any row and needs no divisibility); more shards (multiples of 960)
# only to keep shards below ~512 MB.
SHARD_UNIT = 960
TARGET_SHARD_BYTES = 512 << 20
MIN_ROWS_PER_SHARD = 64
SMALL_SHARD_COUNTS = (480, 240, 120, 96, 64, 48, 32, 16, 8, 4, 2, 1)

JPEG_SOI = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class SourceError(ValueError):
    """Bad input. The message names the file and, when known, the record key and byte offset.
    One string argument, so that it pickles back from a worker process unchanged."""


class OutputError(ValueError):
    """The output directory is in a state the converter must not touch (foreign files, another conversion)."""


class Interrupted(Exception):
    """Ctrl-C in the main process; finished shards are kept for a resume."""


class _Stopped(Exception):
    """A worker gave up its shard because the main process asked all workers to stop."""


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
class Source:
    """What a front-end hands the engine. The Source stays in the main process; workers get only `reader`
    (small, picklable) and, per shard, `items(positions)` (what `reader.rows` needs to read those images)."""
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
    if num_samples >= SHARD_UNIT * MIN_ROWS_PER_SHARD:
        return SHARD_UNIT * max(1, -(-nbytes // (SHARD_UNIT * TARGET_SHARD_BYTES)))
    return next((n for n in SMALL_SHARD_COUNTS if num_samples // n >= MIN_ROWS_PER_SHARD), 1)


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


# ---- the workers ----

class _HashingFile:
    """A write-only file that hashes what passes through, so a shard is never read back for its checksum."""

    def __init__(self, f):
        self.f, self.digest, self.closed = f, sha256(), False

    def write(self, data) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:  # the Arrow writer closes its sink; the caller still needs the file for fsync
        self.closed = True


_worker: dict[str, Any] = {}


def _init_worker(reader: Any, out: str, num_shards: int, stop, progress) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: it tells workers via `stop`
    _worker.update(reader=reader, out=Path(out), num_shards=num_shards, stop=stop, progress=progress)


def _report(rows: int, nbytes: int) -> None:
    progress = _worker["progress"]
    with progress.get_lock():
        progress[0] += rows
        progress[1] += nbytes


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


def ensure_shard(i: int, items: Any, rows: int, first: int, last: int) -> tuple[ShardInfo, bool]:
    """Shard `i`, kept from an earlier run when it checks out, else written; (info, kept)."""
    if _worker["stop"].is_set():
        raise _Stopped()
    out, name = _worker["out"], shard_name(i, _worker["num_shards"])
    kept = _kept_shard(out, name, rows, first, last)
    if kept is not None:
        _report(kept.rows, kept.bytes)
        return kept, True
    try:
        return _write_shard(out, name, items, rows, first, last), False
    except RecordIOError as e:  # its keyword-only constructor does not survive pickling back to the main process
        raise SourceError(str(e)) from None


def _write_shard(out: Path, name: str, items: Any, rows: int, first: int, last: int) -> ShardInfo:
    partial = out / (name + PARTIAL)
    written = 0
    try:
        with open(partial, "wb") as f:
            sink = _HashingFile(f)
            with pa.ipc.new_stream(sink, SCHEMA) as writer:
                for images, labels, indexes in _batches(_worker["reader"].rows(items)):
                    if _worker["stop"].is_set():
                        raise _Stopped()
                    writer.write_batch(pa.record_batch(
                        [pa.array(images, pa.binary()), pa.array(labels, pa.int64()), pa.array(indexes, pa.int64())],
                        schema=SCHEMA))
                    written += len(images)
                    _report(len(images), sum(map(len, images)))
            f.flush()
            os.fsync(f.fileno())
        if written != rows:
            raise RuntimeError(f"{name}: wrote {written} rows, planned {rows}")
        info = ShardInfo(name, rows, partial.stat().st_size, sink.digest.hexdigest())
        os.replace(partial, out / name)  # the directory is fsynced once, before the manifest
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    # Not fsynced: a sidecar lost in a crash only costs rewriting its shard, and a resume checks the shard's
    # sha256 against it anyway. Per-shard fsyncs of sidecars and directories took ~2 ms a shard here.
    write_json_atomic(_sidecar(out, name), {**asdict(info), "first_index": first, "last_index": last},
                      durable=False)
    return info


def _batches(rows: Iterator[tuple[bytes, int, int]]) -> Iterator[tuple[list, list, list]]:
    images, labels, indexes = [], [], []
    for image, label, index in rows:
        images.append(image)
        labels.append(label)
        indexes.append(index)
        if len(images) == ROWS_PER_RECORD_BATCH:
            yield images, labels, indexes
            images, labels, indexes = [], [], []
    if images:
        yield images, labels, indexes


def mp_context():
    """forkserver: workers fork from a clean server process, not from a main process that may run threads
    (tqdm's monitor, Arrow's pools), and start in milliseconds once the server has imported the converter."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["data_prep.convert"])
    return ctx


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


# ---- the conversion ----

def convert(source: Source, out: str | os.PathLike, *, num_shards: int | None = None, order: str = "shuffled",
            seed: int = 0, workers: int | None = None, overwrite: bool = False,
            on_shard_done: Callable[[int], None] | None = None) -> Manifest:
    """Convert `source` into shards in `out`; returns the manifest (also when the output was already finished).
    `on_shard_done(n)` is called in the main process after each finished shard (tests use it to crash)."""
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
        shards = _run_pool(source, out, num_shards, shard_order(n, order, seed), workers or default_workers(),
                           on_shard_done)
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


def _run_pool(source: Source, out: Path, num_shards: int, order: np.ndarray, workers: int,
              on_shard_done: Callable[[int], None] | None) -> list[ShardInfo]:
    bounds = np.concatenate([[0], np.cumsum(rows_per_shard(len(source), num_shards))])
    ctx = mp_context()
    stop, progress = ctx.Event(), ctx.Array("q", 2)
    infos: dict[int, ShardInfo] = {}
    written_rows = written_bytes = kept = 0
    start = time.perf_counter()
    bar = tqdm(total=len(source), unit="rec", unit_scale=True, file=sys.stderr, mininterval=0.5, smoothing=0.1)
    todo = iter(range(num_shards))
    with ProcessPoolExecutor(max_workers=min(workers, num_shards), mp_context=ctx, initializer=_init_worker,
                             initargs=(source.reader, str(out), num_shards, stop, progress)) as pool:
        running: dict = {}

        def submit_next() -> None:  # a few tasks ahead only: each carries its shard's items
            i = next(todo, None)
            if i is not None:
                positions = order[bounds[i]:bounds[i + 1]]
                first, last = (int(source.indexes[positions[j]]) for j in (0, -1))
                running[pool.submit(ensure_shard, i, source.items(positions), len(positions), first, last)] = i

        try:
            for _ in range(2 * workers):
                submit_next()
            while running:
                done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                bar.update(progress[0] - bar.n)
                bar.set_postfix_str(f"{progress[1] / 1e6:,.0f} MB", refresh=False)
                for future in done:
                    i = running.pop(future)
                    infos[i], was_kept = future.result()
                    if was_kept:
                        kept += 1
                    else:
                        written_rows, written_bytes = written_rows + infos[i].rows, written_bytes + infos[i].bytes
                    submit_next()
                    if on_shard_done:
                        on_shard_done(len(infos))
        except BaseException as e:
            stop.set()  # running shards stop at their next batch and delete their partials
            for future in running:
                future.cancel()
            wait(running)
            bar.close()
            if isinstance(e, KeyboardInterrupt):
                raise Interrupted(f"interrupted: {len(infos)} of {num_shards} shards are finished in {out}; rerun "
                                  f"the same command to resume") from None
            if isinstance(e, BrokenProcessPool):
                raise RuntimeError(f"a worker process died (out of memory?); {len(infos)} of {num_shards} shards "
                                   f"are finished in {out}; rerun the same command to resume") from None
            raise
    bar.close()
    seconds = time.perf_counter() - start
    print(f"wrote {written_rows:,} records ({written_bytes / 1e6:,.1f} MB) into {num_shards - kept} shards in "
          f"{seconds:.1f} s: {written_rows / seconds:,.0f} records/s, {written_bytes / 1e6 / seconds:,.1f} MB/s "
          f"({min(workers, num_shards)} workers)" + (f"; kept {kept} finished shards" if kept else ""))
    return [infos[i] for i in range(num_shards)]


# ---- the command line, shared by the front-ends ----

def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output directory (created; must be empty, a resumable conversion of the same "
                                    "sources, or --overwrite)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="worker processes, one shard each at a time (default: min(8, CPUs))")
    parser.add_argument("--shards", type=int, default=None,
                        help="number of shards (default: a multiple of 960 with shards <= ~512 MB; fewer for small "
                             "datasets)")
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
    except RuntimeError as e:  # a worker died: the message says what is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: finished shards stay for a resume
        print(f"error: {e}; finished shards are kept: rerun the same command to resume", file=sys.stderr)
        return 1
    return 0
