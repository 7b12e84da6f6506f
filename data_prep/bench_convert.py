"""Conversion speed against a plain read of the same .rec, in one run.

    python -m data_prep.bench_convert [--size-gb 1.0] [--dir /tmp/ds_face_bench_convert] [--workers N]

Generates (once, cached in --dir) an InsightFace-layout .rec of at least --size-gb: a few hundred synthetic
112x112 "faces" encoded by PIL at JPEG quality 90 (~5-7 KB), reused round-robin, ~50 images per identity. Then
times (a) a sequential scan of the .rec (every record read and copied out), (b) rec2arrow --order source,
(c) rec2arrow --order shuffled, (d) the same with fewer, bigger shards, (e) verify of (c). The converter's worker
server is started before the timings (~1 s, once per command). The page cache cannot be dropped without root, so
the .rec is read once first and every variant runs warm; the shards go to the same disk, fsynced.
"""
from __future__ import annotations

import argparse
import io
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from data_prep import rec2arrow, verify
from data_prep.convert import default_workers, mp_context
from data_prep.recordio import RecordReader, pack_image_record, write_recordio


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


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def start_forkserver() -> None:
    """The converter's workers fork from a server that imports the converter first (~1 s, torch included)."""
    with ProcessPoolExecutor(1, mp_context=mp_context()) as pool:
        pool.submit(int).result()


def scan(rec: Path) -> tuple[int, int]:
    records = nbytes = 0
    with RecordReader(rec) as reader:
        for _, payload in reader.scan():
            records += 1
            nbytes += len(payload)
    return records, nbytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.bench_convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--dir", default="/tmp/ds_face_bench_convert", help="cache of the generated .rec, and outputs")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--few-shards", type=int, default=96,
                        help="shard count of variant (d): bigger shards show the fixed cost per shard")
    parser.add_argument("--keep", action="store_true", help="keep the converted outputs")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    src = root / f"rec-{args.size_gb:g}gb"
    if not (src / "complete").exists():
        seconds, _ = timed(lambda: generate(src, args.size_gb))
        print(f"generated {src} in {seconds:.0f} s")
    rec = src / "train.rec"
    rec_bytes = rec.stat().st_size
    with open(rec, "rb") as f:  # warm the page cache: every variant below reads from memory
        while f.read(64 << 20):
            pass

    rows = []
    seconds, _ = timed(start_forkserver)
    print(f"worker server started in {seconds:.2f} s (once per process, not in the figures below)")
    seconds, (records, nbytes) = timed(lambda: scan(rec))
    rows.append(("(a) sequential read: RecordReader.scan", seconds, records, rec_bytes))
    variants = [("(b) rec2arrow --order source", "source", []), ("(c) rec2arrow --order shuffled", "shuffled", []),
                (f"(d) rec2arrow --order shuffled --shards {args.few_shards}", "shuffled-few",
                 ["--shards", str(args.few_shards)])]
    for name, label, extra in variants:
        out = root / f"out-{label}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh conversion each time, not a resume or an --overwrite
        argv = [str(src), str(out), "--order", label.split("-")[0], "--workers", str(args.workers), *extra]
        seconds, code = timed(lambda: rec2arrow.main(argv))
        assert code == 0, f"rec2arrow exited {code}"
        manifest = verify.read_manifest(out)
        rows.append((name + ("" if extra else f" ({len(manifest.shards)} shards)"), seconds, manifest.num_samples,
                     rec_bytes))
    manifest = verify.read_manifest(root / "out-shuffled")
    seconds, _ = timed(lambda: verify.verify(str(root / "out-shuffled"), args.workers))
    rows.append(("(e) verify (c): sha256, schema, labels, unique index", seconds, manifest.num_samples,
                 sum(s.bytes for s in manifest.shards)))

    read_seconds = rows[0][1]
    print(f"\n{records:,} records, {rec_bytes / 1e9:.2f} GB .rec ({nbytes / records / 1e3:.1f} KB per record), "
          f"{args.workers} workers, warm page cache; records/s counts all .rec records in (a), images in (b)-(e), "
          f"MB/s the .rec size (shard bytes in (e))\n")
    print("| step | seconds | records/s | MB/s | / read |")
    print("| --- | --- | --- | --- | --- |")
    for name, seconds, n, size in rows:
        print(f"| {name} | {seconds:.2f} | {n / seconds:,.0f} | {size / 1e6 / seconds:,.0f} | "
              f"{seconds / read_seconds:.1f}x |")
    if not args.keep:
        for _, label, _ in variants:
            shutil.rmtree(root / f"out-{label}", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
