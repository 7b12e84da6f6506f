"""The conversion engine shared by `data_prep.rec2arrow` and `data_prep.folder2arrow`.

A front-end describes its input as a `Source` (one entry per image, in source order). The engine reads it once,
sequentially, in chunks of many records (`Source.chunks`: parsed in bulk, images as Arrow arrays, no Python
object per record), and deals each chunk's rows to the shards of `ds_face.data.shards` that the plan puts them
in; all shards are written at once by a thread pool. On disk, in the output directory:

    plan.json                written first: sources (paths, sizes, mtimes) and the options that shape the shards
    data-*.arrow.*.partial   a shard being written (ds_face.fileio: a fresh name, created exclusively, no link
                             followed); renamed to data-*.arrow once complete and fsynced
    .done/data-*.arrow.json  written after the rename: rows, bytes, sha256, first/last planned index
    property, *.bin, ...     carried files
    manifest.json            written last; then .done/ is removed

An output in object storage (`s3://bucket/prefix`, any fsspec URL) is converted the same way into a fresh local
staging directory, each finished shard uploaded under its final name with its sidecar, the manifest last
(`data_prep.store_output`); a re-run resumes from what the store holds.

Re-running the same command on an output with a plan but no manifest resumes: shards whose sidecar matches
(rows, planned first/last index, size, sha256) are kept, the others rewritten (the pass skips the kept shards'
rows). All shards finish together at the end of the one pass, so a crash during it keeps only the plan; at
disk speed the pass is minutes even for WebFace42M (BENCHMARKS.md). Bad input is checked as far as
possible before anything is written; a bad record found during the pass stops it, and a conversion that
started from a new or empty directory then removes everything it wrote (fixing the input changes its mtime,
so those shards could never be resumed).

Its parts: `data_prep.source` (what a front-end hands over), `data_prep.plan` (the plan and the output
directory's state), `data_prep.shard_writer` (one shard and its sidecar); here, the one pass and the command
line the front-ends share.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from pathlib import Path
from queue import Empty, Queue
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from data_prep.plan import (
    DONE_DIR, PLAN, OutputError, chunk_bytes_for, choose_num_shards, describe_shard_count, inspect_output, make_plan,
    remove_owned, shard_order,
)
from data_prep.recordio import RecordIOError
from data_prep.shard_writer import ShardWriter, kept_shard
from data_prep.source import Chunk, Source, SourceError
from data_prep.store_output import StoreOutput
from ds_face.data.shards import (
    ROWS_PER_RECORD_BATCH, Manifest, ShardError, ShardInfo, read_manifest, rows_per_shard, shard_name,
)
from ds_face.data.store import StoreError, is_remote
from ds_face.fileio import PARTIAL, WriteError, fsync_path, real_dir, write_atomic, write_json_atomic
from ds_face.runtime.cpus import worker_processes


class Interrupted(Exception):
    """Ctrl-C in the main process; finished shards are kept for a resume."""


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


def mp_context():
    """For `data_prep.verify`'s process pool. forkserver: workers fork from a clean server process, not from a
    main process that may run threads (tqdm's monitor, Arrow's pools)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["data_prep.convert"])
    return ctx


# ---- the conversion ----

def convert(source: Source, out: str | os.PathLike, *, num_shards: int | None = None, order: str = "shuffled",
            seed: int = 0, workers: int | None = None, overwrite: bool = False,
            on_shard_done: Callable[[int], None] | None = None, chunk_bytes: int | None = None,
            staging: str | os.PathLike | None = None) -> Manifest:
    """Convert `source` into shards in `out`, a directory or an object-store URL; returns the manifest (also when
    the output was already finished). `on_shard_done(n)` is called in the main thread after each finished shard
    (uploaded, for a store; tests use it to crash); `chunk_bytes` overrides the size of the chunks the source is
    read in (tests use tiny ones); `staging`: where a store's shards are written before their upload (a fresh
    directory is made inside it, default the system's temporary directory, and removed at the end)."""
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
    if is_remote(out):
        if overwrite:
            raise OutputError(f"{out}: --overwrite is for local directories; a dataset in a store is never "
                              f"overwritten in place: choose a new prefix")
        return _convert_to_store(source, str(out), plan, num_shards, shard_order(n, order, seed), workers,
                                 on_shard_done, chunk_bytes, staging)
    out = Path(out)
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
    real_dir(out / DONE_DIR)  # the sidecars go there: a link at its name would send them elsewhere
    for name in os.listdir(out):  # a crash mid-write leaves partials; they are never resumed, only redone
        if name.endswith(PARTIAL):
            (out / name).unlink()  # a link: the link itself
    if mode != "resume":
        write_json_atomic(out / PLAN, plan)
    try:
        shards = _write_shards(source, out, num_shards, shard_order(n, order, seed), workers or worker_processes(),
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
    manifest = _manifest(source, plan, shards)
    manifest.write(out)  # atomic and durable
    shutil.rmtree(out / DONE_DIR)  # the manifest now holds what the sidecars held
    return manifest


def _manifest(source: Source, plan: dict, shards: list[ShardInfo]) -> Manifest:
    return Manifest(num_samples=len(source), num_classes=source.num_classes, shards=shards,
                    image_size=source.image_size, sources=[{"file": f["file"], "bytes": f["bytes"]} for f in source.files],
                    carried=sorted(source.carried), converter=plan["converter"],
                    options={k: plan["options"][k] for k in ("order", "seed")})


def _convert_to_store(source: Source, url: str, plan: dict, num_shards: int, order: np.ndarray, workers: int | None,
                      on_shard_done: Callable[[int], None] | None, chunk_bytes: int | None,
                      staging: str | os.PathLike | None) -> Manifest:
    """The conversion into a local staging directory, each finished shard uploaded (`data_prep.store_output`)."""
    output = StoreOutput(url)
    mode = output.inspect(plan)
    n = len(source)
    if mode == "finished":
        print(f"{url}: already converted ({n} samples in {num_shards} shards); nothing to do")
        return read_manifest(url)
    if staging is not None:
        real_dir(staging)
    with tempfile.TemporaryDirectory(prefix="ds_face-convert-", dir=staging) as work:
        work = Path(work)
        print(f"{source.converter}: {n} images, {source.num_classes} classes -> {url} (staging in {work})")
        print(describe_shard_count(num_shards, n, source.nbytes))
        real_dir(work / DONE_DIR)
        if mode == "resume":
            print(f"resuming the unfinished conversion in {url} (its {PLAN} matches)")
        else:
            output.put_plan(plan, work)
        try:
            shards = _write_shards(source, work, num_shards, order, workers or worker_processes(), on_shard_done,
                                   chunk_bytes or chunk_bytes_for(num_shards), output)
        except SourceError:
            if mode != "resume":  # as for a local output: these could never be resumed once the input is fixed
                output.remove(output.written)
            raise
        for name, what in source.carried.items():
            write_atomic(work / name, what if isinstance(what, bytes) else Path(what).read_bytes(), durable=False)
            output.put(work / name, name)
        manifest = _manifest(source, plan, shards)
        output.finish(manifest, work)
    print(f"uploaded {output.uploaded_bytes / 1e6:,.1f} MB to {url}")
    return manifest


def _write_shards(source: Source, out: Path, num_shards: int, order: np.ndarray, workers: int,
                  on_shard_done: Callable[[int], None] | None, chunk_bytes: int,
                  output: StoreOutput | None = None) -> list[ShardInfo]:
    """One sequential pass over the source: each chunk's rows are dealt to the shards the plan puts them in
    (shard i holds the source positions order[bounds[i]:bounds[i+1]], in source order), every shard open at
    once. Threads, not processes: the work (reading, Arrow copies, sha256, writes) releases the GIL, and no
    image bytes cross a process boundary. With `output` (a store), `out` is the staging directory: shards
    already in the store are kept, and each finished shard is uploaded by the thread that finished it."""
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
            keep = output.kept if output else (lambda *p: kept_shard(out, *p))
            for i, kept in enumerate(pool.map(lambda p: keep(*p), plans)):
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
            finishing = {pool.submit(_finish, writer, output): i for i, writer in writers.items()}
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
                raise Interrupted(f"interrupted: {len(infos)} of {num_shards} shards are finished in "
                                  f"{output.url if output else out}; rerun the same command to resume") from None
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


def _finish(writer: ShardWriter, output: StoreOutput | None) -> ShardInfo:
    info = writer.finish()
    if output is not None:
        output.publish(info, writer.out)
    return info


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
                                    "sources, or --overwrite), or an object-store URL (s3://bucket/prefix: an "
                                    "empty prefix or a resumable conversion of the same sources; credentials and "
                                    "endpoint from the client's environment, e.g. AWS_* for S3)")
    parser.add_argument("--workers", type=int, default=worker_processes(),
                        help="threads that copy, hash and write shards (default: min(8, CPUs))")
    parser.add_argument("--shards", type=int, default=None,
                        help="number of shards (default: shards of ~256 MB, each of at least 64 rows)")
    parser.add_argument("--order", choices=("shuffled", "source"), default="shuffled",
                        help="shuffled (default): every shard a uniform sample of identities; source: source order, "
                             "sequential reads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled order (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous conversion in OUT (removes only files the converter writes; "
                             "local directories only)")
    parser.add_argument("--staging", metavar="DIR", default=None,
                        help="OUT a URL: a fresh directory is made in DIR (default: the system's temporary "
                             "directory, $TMPDIR) for the shards before their upload, and removed when the "
                             "command ends (a killed one leaves it: ds_face-convert-*); it needs room for the "
                             "shards not yet in the store")


def run_cli(make_source: Callable[[], Source], args: argparse.Namespace,
            on_shard_done: Callable[[int], None] | None = None) -> int:
    """0 done, 2 bad input or unusable output directory, 1 another failure (resumable), 130 interrupted."""
    try:
        if args.workers < 1:
            raise SourceError(f"--workers {args.workers}: must be at least 1")
        convert(make_source(), args.out, num_shards=args.shards, order=args.order, seed=args.seed,
                workers=args.workers, overwrite=args.overwrite, on_shard_done=on_shard_done, staging=args.staging)
    except (SourceError, RecordIOError, OutputError, WriteError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"error: {e}", file=sys.stderr)
        return 130
    except RuntimeError as e:  # the message says what is kept
        print(f"error: {e}", file=sys.stderr)
        return 1
    except StoreError as e:  # the store stayed unreachable: what it holds is kept
        print(f"error: {e}; shards already in the store are kept: rerun the same command to resume", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: finished shards stay for a resume
        print(f"error: {e}; finished shards are kept: rerun the same command to resume", file=sys.stderr)
        return 1
    return 0
