"""``python -m ds_face.bench.ijb``: the IJB protocol's cost at IJB-C scale, on synthetic data.

    python -m ds_face.bench.ijb [--images 469375] [--templates 23124] [--pairs 15658489] [--dim 512]
        [--crops 200 --crop-sizes 250,600] [--workers 2 --worker-images 4000] [--no-baseline] [--parse]
        [--json out.json]

1. **After the backbone** (``ds_face.ijb.evaluate_features``'s steps), on random image features of IJB-C's
   shape: template aggregation, pair scoring (blocked template Gram matrix), ROC + TAR@FAR; beside the
   scoring, in the same run, arcface_torch's way of scoring (gather both templates' features for 100k
   pairs at a time and sum their products; here in float32, arcface_torch uses float64) on the same pairs.
   ``--parse`` also writes a pair list of that size and times ``read_pairs`` on it.
2. **Decode + align** per image: JPEG loose crops of the given sizes with random landmarks, read, header
   checked, decoded, aligned to 112x112 (``ds_face.ijb.load_aligned``), in this process and in ``--workers``
   processes (``aligned_chunks``, over ``--worker-images`` images, the pool's start included), as images/s.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ds_face import ijb
from ds_face.images import decode
from ds_face.runtime.cpus import cores, worker_processes
from ds_face.runtime.markdown import markdown_table


def synthetic_meta(images: int, templates: int, pairs: int, genuine_fraction: float, rng) -> ijb.IJBMeta:
    """IJB-C-shaped ids: every template has images, ~3 images per media, pairs between distinct templates."""
    tids = rng.permutation(templates)[np.arange(images) % templates] * 7 + 1
    medias = rng.integers(0, max(1, images // (3 * templates)) + 1, images)
    t1 = rng.integers(0, templates, pairs) * 7 + 1
    t2 = (t1 - 1) // 7
    t2 = ((t2 + rng.integers(1, templates, pairs)) % templates) * 7 + 1
    labels = (rng.random(pairs) < genuine_fraction).astype(np.int8)
    return ijb.IJBMeta(Path("."), "SYNTH", {}, [], np.zeros((images, 5, 2), np.float32),
                       rng.uniform(0.5, 1.0, images).astype(np.float32), tids, medias, t1, t2, labels)


def gather_scores(tfeats: np.ndarray, i1: np.ndarray, i2: np.ndarray, batch: int = 100_000) -> np.ndarray:
    """arcface_torch's verification(): for 100k pairs at a time, gather both features and sum the products."""
    out = np.empty(len(i1), np.float32)
    for a in range(0, len(i1), batch):
        out[a:a + batch] = np.sum(tfeats[i1[a:a + batch]] * tfeats[i2[a:a + batch]], -1)
    return out


def bench_protocol(args, rng) -> dict:
    meta = synthetic_meta(args.images, args.templates, args.pairs, 19557 / 15658489, rng)
    feats = rng.standard_normal((args.images, args.dim), dtype=np.float32)
    result = {"images": args.images, "templates": args.templates, "pairs": args.pairs, "dim": args.dim}
    started = time.perf_counter()
    unique_t, tfeats = ijb.template_features(feats, meta.scores, meta.templates, meta.medias)
    result["templates_s"] = time.perf_counter() - started
    del feats
    i1, i2 = ijb.template_index(unique_t, meta.pair_t1), ijb.template_index(unique_t, meta.pair_t2)
    started = time.perf_counter()
    scores = ijb.pair_scores(tfeats, i1, i2)
    result["scoring_s"] = time.perf_counter() - started
    started = time.perf_counter()
    fpr, tpr, thr = ijb.roc_curve(meta.labels, scores)
    ijb.tar_at_far(fpr, tpr, thr)
    ijb.auc(fpr, tpr)
    result["roc_s"] = time.perf_counter() - started
    if not args.no_baseline:
        started = time.perf_counter()
        base = gather_scores(tfeats, i1, i2)
        result["baseline_gather_s"] = time.perf_counter() - started
        result["max_abs_diff"] = float(np.abs(base - scores).max())
    if args.parse:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pairs.txt"
            np.savetxt(path, np.stack([meta.pair_t1, meta.pair_t2, meta.labels.astype(np.int64)], 1), fmt="%d")
            started = time.perf_counter()
            ijb.read_pairs(path)
            result["parse_pairs_s"] = time.perf_counter() - started
    return result


def write_crops(directory: Path, count: int, side: int, rng) -> ijb.IJBMeta:
    """JPEG loose crops (q95) of side x side with a face-sized landmark set somewhere inside."""
    from PIL import Image
    names, marks = [], []
    base = rng.integers(0, 256, (side // 8 + 1, side // 8 + 1, 3), dtype=np.uint8)
    for k in range(count):
        image = Image.fromarray(np.roll(base, k, axis=0)).resize((side, side), Image.BICUBIC)
        name = f"{side}_{k}.jpg"
        image.save(directory / name, quality=95)
        scale = rng.uniform(0.4, 0.7) * side / 112
        offset = rng.uniform(0.1, 0.2, 2) * side
        names.append(name)
        marks.append(ijb.ARCFACE_TEMPLATE * scale + offset)
    return ijb.IJBMeta(directory.parent, "SYNTH", {"landmarks": Path("crops.txt")}, names,
                       np.asarray(marks, np.float32), np.ones(count, np.float32), np.zeros(count, np.int64),
                       np.zeros(count, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int8))


def bench_decode(args, rng) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        crop = Path(tmp) / "loose_crop"
        crop.mkdir()
        for side in args.crop_sizes:
            meta = write_crops(crop, args.crops, side, rng)
            paths = [crop / n for n in meta.names]
            started = time.perf_counter()
            decoded = [decode(p.read_bytes()) for p in paths]
            decode_s = time.perf_counter() - started
            started = time.perf_counter()
            for image, m in zip(decoded, meta.landmarks):
                ijb.align(image, m)
            align_s = time.perf_counter() - started
            started = time.perf_counter()
            for p, m in zip(paths, meta.landmarks):
                ijb.load_aligned(p, m, "bench")
            one_s = time.perf_counter() - started
            kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
            row = {"side": side, "images": args.crops, "jpeg_kb": kb,
                   "decode_ms": 1e3 * decode_s / args.crops, "align_ms": 1e3 * align_s / args.crops,
                   "in_process_ms": 1e3 * one_s / args.crops, "in_process_img_s": args.crops / one_s}
            if args.workers > 0:  # the crops listed over and over: args.worker_images in all, pool start included
                reps = -(-args.worker_images // args.crops)
                many = ijb.IJBMeta(meta.root, meta.target, meta.files, (meta.names * reps)[:args.worker_images],
                                   np.tile(meta.landmarks, (reps, 1, 1))[:args.worker_images], *([None] * 6))
                started = time.perf_counter()
                for _ in ijb.aligned_chunks(many, args.workers):
                    pass
                row["workers"] = args.workers
                row["workers_img_s"] = args.worker_images / (time.perf_counter() - started)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ds_face.bench.ijb", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=469_375, help="images (IJB-C: 469375)")
    parser.add_argument("--templates", type=int, default=23_124, help="templates (IJB-C: 23124)")
    parser.add_argument("--pairs", type=int, default=15_658_489, help="template pairs (IJB-C: 15658489)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--crops", type=int, default=200, help="JPEG crops per size for decode + align")
    parser.add_argument("--crop-sizes", default="250,600", help="crop sides in pixels, comma-separated")
    parser.add_argument("--worker-images", type=int, default=4000, help="images decoded by the workers (default 4000)")
    parser.add_argument("--workers", type=int, default=worker_processes(), help="decode processes")
    parser.add_argument("--no-baseline", action="store_true", help="skip arcface_torch-style gather scoring")
    parser.add_argument("--parse", action="store_true", help="also time reading a pair list of --pairs lines")
    parser.add_argument("--skip-protocol", action="store_true", help="only decode + align")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.crop_sizes = [int(s) for s in args.crop_sizes.split(",") if s]
    rng = np.random.default_rng(args.seed)
    import platform
    print(f"{platform.processor() or platform.machine()}, {cores()} CPUs visible, numpy {np.__version__}")
    report = {"cpus": cores()}
    if not args.skip_protocol:
        p = bench_protocol(args, rng)
        report["protocol"] = p
        print(f"\nAfter the backbone: {p['images']} images, {p['templates']} templates, {p['pairs']} pairs, "
              f"D={p['dim']}\n")
        steps = []
        if "parse_pairs_s" in p:
            steps.append(["read the pair list (np.loadtxt)", f"{p['parse_pairs_s']:.2f}"])
        steps.append(["template features (media mean, template sum, L2)", f"{p['templates_s']:.2f}"])
        steps.append(["pair scores, blocked template Gram (ds_face)", f"{p['scoring_s']:.2f}"])
        if "baseline_gather_s" in p:
            steps.append(["pair scores, gather 100k pairs at a time (arcface_torch's way, float32)",
                          f"{p['baseline_gather_s']:.2f} ({p['baseline_gather_s'] / p['scoring_s']:.1f}x; max |diff| "
                          f"{p['max_abs_diff']:.1e})"])
        steps.append(["ROC, TAR@FAR, AUC", f"{p['roc_s']:.2f}"])
        print(markdown_table(["step", "seconds"], steps, align="lr"))
    rows = bench_decode(args, rng)
    report["decode_align"] = rows
    print("\nDecode + align to 112x112, per image (JPEG q95 loose crops, random landmarks)\n")
    header = ["crop", "JPEG KB", "decode ms", "align ms", "read+check+decode+align ms", "img/s, 1 process",
              "img/s, workers"]
    print(markdown_table(header, [
        [f"{r['side']}x{r['side']}", f"{r['jpeg_kb']:.0f}", f"{r['decode_ms']:.2f}", f"{r['align_ms']:.2f}",
         f"{r['in_process_ms']:.2f}", f"{r['in_process_img_s']:.0f}",
         f"{r['workers_img_s']:.0f} ({r['workers']} workers)" if "workers" in r else "-"] for r in rows],
        align="l" + "r" * (len(header) - 1)))
    if args.json:
        from ds_face.fileio import write_json_atomic
        write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
