"""Training-loader throughput from an object store, side by side in one run: the same shards read locally, from
the store through an empty (cold) node cache, through the cache that run filled (warm), and through a cache
smaller than the dataset (shards evicted as the epoch moves on).

    python -m data_prep.bench_store [--size-gb 0.25] [--shards 64] [--batch 128] [--workers 2] [--url s3://B/P]

Every variant is ds_face's training loader (``ds_face.data.Loader`` over ``ArrowFaces``) as
``data_prep.bench_loader`` runs it: one rank (``BatchLayout(batch, 1, 1)``), ``--workers`` DataLoader workers,
16 streams, one epoch (every whole batch of it), one compute thread. Store variants read the dataset's URL;
``ArrowFaces`` fetches each shard whole into the node cache (``ds_face.data.cache``), a prefetch thread ahead
of the readers in the run's order, and the readers memory-map the cached copy.

The dataset: ``data_prep.bench_convert``'s synthetic 112x112 JPEGs (~6 KB) converted by ``data_prep.rec2arrow``
into ``--shards`` shards (generated once into ``--dir``), or ``--arrow-dir``. The store: by default a moto S3
server (``moto[server]``, a test dependency: ``pip install -e .[test]``) that this command starts on loopback in
a child process of its own (its CPU is reported apart from the loader's) and uploads the dataset to; or
``--url s3://bucket/prefix``, a real store, with credentials and endpoint from the client's environment (for S3:
``AWS_*``, ``~/.aws``): an empty prefix gets the dataset uploaded, a prefix holding the same dataset (the same
manifest.json) is read as it is, any other is refused.

Per variant: samples/s; samples/s per core, counting the loader's processes (``--workers`` + the main process,
at most the CPUs here), and samples per CPU-second the loader's processes used (their user + system time,
workers included); the ratio to local shards; and, from the loader's own end-of-pass log line (printed below
the table): the readers' shard gets served by the node cache / all their gets, the bytes fetched from the store
per sample, and the store calls retried.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ds_face.runtime.markdown import markdown_table

# ds_face.data.loader's end-of-pass line for a dataset in a store
LOG_LINE = re.compile(r"this rank read (\d+) shard\(s\), ([\d.]+)% from the node's cache; ([\d,]+) bytes fetched "
                      r"per sample; (\d+) retr")
BUCKET = "ds-face-bench"


@dataclass
class Result:
    name: str
    samples: int
    seconds: float
    cpu_seconds: float  # the loader's processes: this one and its reaped workers
    server_cpu: float | None  # the moto server's, when this command started one
    log: str | None  # the loader's object-store line; None for local shards
    skipped: str | None = None

    def store_figures(self) -> tuple[int, float, int, int] | None:
        """(shard gets, % from the cache, bytes fetched per sample, retries) from the loader's log line."""
        match = LOG_LINE.search(self.log or "")
        if match is None:
            return None
        return int(match[1]), float(match[2]), int(match[3].replace(",", "")), int(match[4])


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# -- the dataset ---------------------------------------------------------------------------------------
def dataset(args) -> Path:
    """--arrow-dir, or bench_convert's synthetic .rec of --size-gb converted into --shards shards (made once)."""
    if args.arrow_dir is not None:
        return args.arrow_dir
    from data_prep import bench_convert, rec2arrow
    rec = args.dir / f"rec-{args.size_gb:g}gb"
    arrow = args.dir / f"arrow-{args.size_gb:g}gb-{args.shards}"
    if not (rec / "complete").exists():
        bench_convert.generate(rec, args.size_gb)
    if not (arrow / "manifest.json").exists():
        code = rec2arrow.main([str(rec), str(arrow), "--shards", str(args.shards), "--overwrite"])
        if code:
            raise SystemExit(f"rec2arrow {rec} -> {arrow} failed (exit {code})")
    return arrow


# -- the store -----------------------------------------------------------------------------------------
class MotoServer:
    """moto's S3 server on a free loopback port, in a child process; the S3 client of this process (and of the
    loader's workers) pointed at it through the standard environment."""

    def __init__(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"moto's S3 server did not start on 127.0.0.1:{self.port}")
            time.sleep(0.2)
        os.environ.update(AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{self.port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        os.environ.pop("AWS_PROFILE", None)  # the environment's keys, not a profile's, for this server

    def cpu_seconds(self) -> float | None:
        """The server's user + system time so far (Linux /proc), None elsewhere."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def upload(local: Path, url: str) -> None:
    """The dataset's files under ``url``, manifest.json last; a prefix that holds this dataset already is kept,
    one that holds anything else is refused (this command never overwrites a store's objects)."""
    import fsspec
    fs, root = fsspec.core.url_to_fs(url)
    ours = (local / "manifest.json").read_bytes()
    try:
        theirs = fs.cat_file(f"{root}/manifest.json")
    except FileNotFoundError:
        theirs = None
    if theirs is not None:
        if json.loads(theirs) != json.loads(ours):
            raise SystemExit(f"{url} holds another dataset (its manifest.json differs from {local}'s); "
                             f"give an empty prefix")
        return
    with contextlib.suppress(FileNotFoundError):
        if fs.ls(root, detail=False):
            raise SystemExit(f"{url} is not empty and holds no manifest.json; give an empty prefix")
    files = sorted(p for p in local.iterdir() if p.is_file() and p.name != "manifest.json")
    for path in [*files, local / "manifest.json"]:
        fs.put_file(str(path), f"{root}/{path.name}")


# -- one variant ---------------------------------------------------------------------------------------
def cpu_seconds() -> float:
    """User + system time of this process and of its children that have ended (the loader's workers)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def measure(name: str, path, args, server: MotoServer | None, cache_dir=None, cache_gb=0.0) -> Result:
    from ds_face.data import ArrowFaces, Loader
    from ds_face.data.arrow import DataError
    from ds_face.data.order import BatchLayout
    source = ArrowFaces(str(path), cache_dir=cache_dir, cache_gb=cache_gb)
    loader = Loader(source, BatchLayout(args.batch, 1, 1), streams=args.streams, num_workers=args.workers)
    stop = source.manifest.num_samples // args.batch * args.batch  # one epoch, every whole batch of it
    lines = _Lines()
    logger = logging.getLogger("ds_face")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        cpu, server_cpu = cpu_seconds(), server.cpu_seconds() if server else None
        start, samples = time.perf_counter(), 0
        try:
            for batch in loader.micro_batches(0, stop):  # the prefetch thread starts with the first batch
                assert batch["image"].shape[1:] == (112, 112, 3)
                samples += len(batch["label"])
        except DataError as err:  # a cache too small for one step's shards: the loader says so, named
            return Result(name, 0, 0.0, 0.0, None, None, skipped=str(err))
        seconds = time.perf_counter() - start
        cpu = cpu_seconds() - cpu
        if server_cpu is not None:
            server_cpu = server.cpu_seconds() - server_cpu
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    store_line = next((line for line in lines.lines if LOG_LINE.search(line)), None)
    return Result(name, samples, seconds, cpu, server_cpu, store_line)


# -- the table -----------------------------------------------------------------------------------------
def table(results: list[Result], cores: int) -> str:
    local = results[0].samples / results[0].seconds
    rows = []
    for r in results:
        if r.skipped:
            rows.append([r.name, "skipped (below)", *["-"] * 9])
            continue
        rate = r.samples / r.seconds
        figures = r.store_figures()
        gets, hit, per_sample, retries = figures if figures else ("-", None, "-", "-")
        rows.append([r.name, f"{r.samples:,}", f"{r.seconds:.1f}", f"{rate:,.0f}", f"{rate / cores:,.0f}",
                     f"{r.samples / r.cpu_seconds:,.0f}" if r.cpu_seconds > 0 else "-", f"{rate / local:.2f}",
                     "-" if hit is None else f"{hit / 100:.3f} of {gets}",
                     per_sample if per_sample == "-" else f"{per_sample:,}", retries,
                     "-" if r.server_cpu is None else f"{r.server_cpu:.1f}"])
    header = ["variant", "samples", "seconds", "samples/s", "samples/s per core", "samples per CPU-s", "vs local",
              "cache hit ratio (of gets)", "bytes fetched / sample", "retries", "store server CPU-s"]
    return markdown_table(header, rows, align="lrrrrrrrrrr")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="data_prep.bench_store", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The default store is moto's S3 server (moto[server], a test dependency "
                                       "of ds_face: pip install -e .[test]); without it, give --url.")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "ds_face_bench_store",
                   help="where the generated dataset is kept between runs and the caches made (removed after)")
    p.add_argument("--arrow-dir", type=Path, default=None, help="a dataset written by data_prep (else generated)")
    p.add_argument("--size-gb", type=float, default=0.25, help="size of the generated dataset (default 0.25)")
    p.add_argument("--shards", type=int, default=64, help="its shard count (default 64)")
    p.add_argument("--url", default=None, help="a real store's prefix (s3://bucket/prefix), empty or holding this "
                                               "dataset; default: a moto S3 server on loopback")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="loader workers (default 2)")
    p.add_argument("--streams", type=int, default=16, help="data.streams (default 16)")
    p.add_argument("--small-cache", type=float, default=0.5,
                   help="the last variant's cache, as a fraction of the dataset's bytes (default 0.5; 0: no such "
                        "variant)")
    args = p.parse_args(argv)
    if args.url is None and not all(importlib.util.find_spec(m) for m in ("moto", "flask", "werkzeug")):
        print("data_prep.bench_store: moto's S3 server is not installed (moto[server], a test dependency: "
              "pip install -e .[test]); install it, or give --url s3://bucket/prefix of a real store",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    import datasets  # noqa: F401 - imports are once per run, not per sample: outside the timers
    import s3fs  # noqa: F401
    from deepspeed.accelerator import get_accelerator
    get_accelerator()
    from data_prep.bench_loader import warm
    from ds_face.data.shards import read_manifest

    args.dir.mkdir(parents=True, exist_ok=True)
    local = dataset(args)
    manifest = read_manifest(local)
    total = sum(s.bytes for s in manifest.shards)
    server = None
    try:
        if args.url is None:
            server = MotoServer()
            import fsspec
            fsspec.filesystem("s3", skip_instance_cache=True).mkdir(BUCKET)
            url = f"s3://{BUCKET}/{local.name}"
        else:
            url = args.url.rstrip("/")
        upload(local, url)
        warm(sorted(local.glob("*.arrow")))
        fits = total * 1.1 / 2**30  # the whole dataset, with room to spare: the warm run fetches nothing
        small = total * args.small_cache / 2**30
        caches = Path(tempfile.mkdtemp(prefix="caches-", dir=args.dir))
        try:
            results = [measure("local shards", local, args, server),
                       measure(f"store, cold cache ({fits:.3g} GiB)", url, args, server, caches / "a", fits),
                       measure("store, warm cache (the cold run's)", url, args, server, caches / "a", fits)]
            if args.small_cache > 0:
                results.append(measure(f"store, cold cache of {args.small_cache:g} x the dataset ({small:.3g} GiB)",
                                       url, args, server, caches / "b", small))
        finally:
            shutil.rmtree(caches, ignore_errors=True)
    finally:
        if server is not None:
            server.stop()
    cores = max(1, min(args.workers + 1, os.cpu_count() or 1))
    where = url if args.url else f"{url} on moto's S3 server, loopback (127.0.0.1)"
    print(f"\n{manifest.num_samples:,} samples in {len(manifest.shards)} shards ({total / 2**20:,.0f} MiB) of {local}; "
          f"store {where}; batch {args.batch}, {args.workers} workers, {args.streams} streams, one epoch per variant, "
          f"one compute thread, {os.cpu_count()} CPUs; per core: samples/s / {cores} (the {args.workers} workers + "
          f"the main process, at most the CPUs)\n")
    print(table(results, cores))
    print("\nThe loader's log:")
    for r in results:
        print(f"  {r.name}: {r.log or r.skipped or '(local shards: no store line)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
