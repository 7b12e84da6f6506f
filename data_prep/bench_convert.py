"""Conversion speed against a plain sequential read of the same .rec, side by side in one run.

    python -m data_prep.bench_convert [--size-gb 1.0] [--cold] [--repeat 3] [--workers N] [--shard-sweep 4,16,64,960]
                                      [--worker-sweep 1,2]

Generates (once, cached in --dir) an InsightFace-layout .rec of at least --size-gb: a few hundred synthetic
112x112 "faces" encoded by PIL at JPEG quality 90 (~5-7 KB), reused round-robin, ~50 images per identity. Then,
--repeat times, each variant once, in this order (so that every repetition sees about the same machine load):

    plain read      the .rec read sequentially in 16 MB blocks, nothing else: the disk's (or page cache's) speed
    plain copy      the .rec read the same way and written to a new file, fsynced: the I/O any conversion that
                    writes its output durably pays, with no work on the bytes (the floor for rec2arrow)
    mxnet scan      MXIndexedRecordIO read_idx + recordio.unpack of every key, only where mxnet is installed
    rec2arrow       the default conversion (shuffled order, automatic shard count), in this process, fsynced
    verify          data_prep.verify of that output (sha256 of every shard, schema, labels, unique index)

each warm (the .rec read just before) and, with --cold, cold: the page cache dropped (sync; echo 3 >
/proc/sys/vm/drop_caches, needs root) right before the variant. --shard-sweep and --worker-sweep add warm conversions
with those shard counts (what the default shard size was chosen from) and thread counts (scaling per core). Ratios
are per repetition (a variant against the plain read, or copy, of the same repetition and temperature), then min /
median / max over repetitions. CPU is the
process's user + system time: a figure the other load on a shared machine disturbs less than wall time.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import resource
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_prep import rec2arrow, verify
from data_prep.convert import mp_context
from data_prep.recordio import pack_image_record, write_recordio
from ds_face.runtime.cpus import worker_processes
from ds_face.runtime.markdown import markdown_table

DROP_CACHES = "/proc/sys/vm/drop_caches"


def face_like_jpeg(rng: np.random.Generator, size: int = 112) -> bytes:
    """A blurred face-ish drawing with sensor-like noise: JPEG sizes like real aligned crops, not like flat fills."""
    x = np.arange(size)[None, :, None]
    background = rng.uniform(40, 200, 3) + x * rng.uniform(-0.5, 0.5, 3)
    img = Image.fromarray(np.clip(np.broadcast_to(background, (size, size, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse([20 + rng.integers(-4, 5), 10, 92 + rng.integers(-4, 5), 108],
                 fill=tuple(int(v) for v in rng.uniform([150, 100, 80], [240, 190, 160])))
    for eye_x in (40, 72):
        draw.ellipse([eye_x - 7, 45, eye_x + 7, 53], fill=(40, 30, 30))
    draw.ellipse([42, 80, 70, 90], fill=(150, 60, 60))
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)
    pixels += rng.normal(0, rng.uniform(10, 20), pixels.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def generate(directory: Path, size_gb: float, distinct: int = 300, seed: int = 0) -> None:
    """train.rec/.idx/property in InsightFace layout (header, images sorted by identity, identity records)."""
    rng = np.random.default_rng(seed)
    jpegs = [face_like_jpeg(rng) for _ in range(distinct)]
    mean_record = np.mean([len(j) for j in jpegs]) + 24 + 8
    num_images = int(size_gb * 1e9 / mean_record) + 1
    counts = []
    while sum(counts) < num_images:
        counts.append(int(rng.integers(20, 81)))  # ~50 images per identity, as in MS1M
    counts[-1] -= sum(counts) - num_images
    id_start = num_images + 1

    def records():
        yield 0, pack_image_record([id_start, id_start + len(counts)], b"", id2=1)
        key = 1
        for label, count in enumerate(counts):
            for _ in range(count):
                yield key, pack_image_record(label, jpegs[key % distinct])
                key += 1
        begin = 1
        for label, count in enumerate(counts):
            yield id_start + label, pack_image_record([begin, begin + count], b"")
            begin += count

    directory.mkdir(parents=True, exist_ok=True)
    write_recordio(directory / "train.rec", directory / "train.idx", records())
    (directory / "property").write_text(f"{len(counts)},112,112\n")
    (directory / "complete").touch()


def drop_page_cache() -> str | None:
    """Drop the page cache (clean pages: sync first); None when done, else why it cannot be."""
    os.sync()
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"cannot drop the page cache ({DROP_CACHES}: {e.strerror}; needs root outside a container)"
    return None


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def plain_read(rec: Path) -> int:
    """Every byte of the .rec, sequentially, into one reused buffer: the most any reader can do."""
    buf = memoryview(bytearray(16 << 20))
    total = 0
    with open(rec, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def plain_copy(rec: Path, target: Path) -> int:
    """``plain_read``, each block also written to ``target``, then fsync: reading plus a durable write. Every
    64 MB the written pages are handed to the disk and the page cache (POSIX_FADV_DONTNEED), as the converter's
    shard writer does: without it the copy is dirty-page throttled and pays for reclaim, up to 4x slower here."""
    buf = memoryview(bytearray(16 << 20))
    total = 0
    with open(rec, "rb", buffering=0) as f, open(target, "wb", buffering=0) as g:
        while n := f.readinto(buf):
            g.write(buf[:n])
            total += n
            if total % (64 << 20) == 0:
                os.posix_fadvise(g.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.fsync(g.fileno())
    target.unlink()
    return total


def mxnet_scan(src: Path) -> int:
    """mxnet's own reader over every key (read_idx + unpack), as arcface_torch's MXFaceDataset reads; run only
    where mxnet is installed (it is not a dependency of ds_face)."""
    from mxnet import recordio
    rec = recordio.MXIndexedRecordIO(str(src / "train.idx"), str(src / "train.rec"), "r")
    total = 0
    for key in rec.keys:
        _, image = recordio.unpack(rec.read_idx(key))
        total += len(image)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.bench_convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--dir", default="/tmp/ds_face_bench_convert", help="cache of the generated .rec, and outputs")
    parser.add_argument("--workers", type=int, default=worker_processes())
    parser.add_argument("--cold", action="store_true", help="also run every variant from a dropped page cache")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shard-sweep", default="", help="comma-separated shard counts to time (warm), e.g. 4,16,960")
    parser.add_argument("--worker-sweep", default="", help="comma-separated thread counts to time (warm), e.g. 1,2")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    src = root / f"rec-{args.size_gb:g}gb"
    if not (src / "complete").exists():
        start = time.perf_counter()
        generate(src, args.size_gb)
        print(f"generated {src} in {time.perf_counter() - start:.0f} s")
    rec = src / "train.rec"
    rec_bytes = rec.stat().st_size
    out = root / "out"
    temperatures = ["warm"]
    if args.cold:
        why = drop_page_cache()
        if why:
            print(f"--cold: {why}; timing warm only")
        else:
            temperatures.insert(0, "cold")

    def convert(extra: list[str]) -> None:
        code = rec2arrow.main([str(src), str(out), "--workers", str(args.workers), *extra])
        assert code == 0, f"rec2arrow exited {code}"

    variants = [("plain read", lambda: plain_read(rec)), ("plain copy", lambda: plain_copy(rec, root / "copy.bin"))]
    has_mxnet = importlib.util.find_spec("mxnet") is not None
    if has_mxnet:
        variants.append(("mxnet scan (read_idx + unpack)", lambda: mxnet_scan(src)))
    variants.append(("rec2arrow (default: shuffled, auto shards)", lambda: convert([])))
    variants.append(("verify of rec2arrow's output", lambda: verify.verify(str(out), args.workers)))
    sweep = [(f"rec2arrow --shards {n}", ["--shards", n]) for n in args.shard_sweep.split(",") if n]
    sweep += [(f"rec2arrow --workers {n}", ["--workers", n]) for n in args.worker_sweep.split(",") if n]

    with ProcessPoolExecutor(1, mp_context=mp_context()) as pool:  # verify's worker server: ~1 s, once
        pool.submit(int).result()
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for rep in range(args.repeat):
        for temperature in temperatures:
            for name, fn in variants:
                if name.startswith("rec2arrow"):
                    shutil.rmtree(out, ignore_errors=True)  # a fresh conversion, not a resume
                if temperature == "cold":
                    drop_page_cache()
                else:
                    warm(rec)
                cpu, start = cpu_seconds(), time.perf_counter()
                fn()
                times.setdefault((name, temperature), []).append((time.perf_counter() - start, cpu_seconds() - cpu))
        for name, extra in sweep:
            shutil.rmtree(out, ignore_errors=True)
            warm(rec)
            cpu, start = cpu_seconds(), time.perf_counter()
            convert(extra)  # a later --workers overrides the default one
            times.setdefault((name, "warm"), []).append((time.perf_counter() - start, cpu_seconds() - cpu))
    shutil.rmtree(out, ignore_errors=True)

    load = os.getloadavg()
    print(f"\n{rec_bytes / 1e9:.2f} GB .rec ({src}), {os.cpu_count()} CPUs, {args.workers} workers, "
          f"{args.repeat} repetitions; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
          f"(1 / 5 / 15 min); MB/s of .rec; ratio = plain read's time / the variant's time, per repetition, "
          f"min / median / max\n")
    def ratios(baseline: str, temperature: str, walls: list[float]) -> list[float]:  # per repetition, sorted
        return sorted(b / w for (b, _), w in zip(times[(baseline, temperature)], walls))

    rows = []
    for (name, temperature), runs in times.items():
        walls = [w for w, _ in runs]
        vs_read, vs_copy = ratios("plain read", temperature, walls), ratios("plain copy", temperature, walls)
        median = statistics.median(walls)
        cpu = "-" if name.startswith("verify") else f"{statistics.median(c for _, c in runs):.2f}"  # its pool's
        rows.append([name, temperature, f"{min(walls):.2f}-{max(walls):.2f}", f"{rec_bytes / 1e6 / median:,.0f}", cpu,
                     f"{vs_read[0]:.2f} / {statistics.median(vs_read):.2f} / {vs_read[-1]:.2f}",
                     f"{statistics.median(vs_copy):.2f}"])
    print(markdown_table(["variant", "cache", "seconds (min-max)", "MB/s (median)", "CPU s (median)",
                          "vs plain read (min / median / max)", "vs plain copy (median)"], rows))
    if not has_mxnet:
        print("\nmxnet is not installed here: no mxnet scan row (pip install mxnet to compare; it is not a dependency)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
