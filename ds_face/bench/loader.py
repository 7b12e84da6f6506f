"""Training-loader throughput: ds_face's Arrow loader vs a naive one-record-at-a-time PIL loop, same images.

    python -m ds_face.bench.loader --rec-dir DIR --arrow-dir DIR [--samples 40000] [--batch 128]

Both produce what the backbone eats: float32 [B, 3, 112, 112] in [-1, 1], randomly flipped, with labels.

* naive: what a first attempt does (and arcface_torch's MXFaceDataset does per sample): read one record
  from the .rec by its .idx offset, unpack, PIL decode, random flip, ToTensor-style float conversion and
  normalisation per image, then stack a batch.
* ds_face: `ArrowFaces` with 0 loader workers, i.e. on this one process, so that the figure is per core:
  `datasets` streaming with a shuffle buffer, simplejpeg decode into a uint8 batch, flip by index,
  normalisation of the whole batch at once.
* ds_face, N workers: the same with DataLoader workers (how training runs; bounded by the cores here).
* decode only, PIL vs simplejpeg: the JPEG decode alone on the same records, which chose the decoder.

Run `python -m data_prep.bench_convert` first: it generates the >= 1 GB .rec and its Arrow conversion, and
prints where. Each variant reads the same number of samples; files are read once before timing (warm cache).
"""
from __future__ import annotations

import argparse
import io
import random
import time
from pathlib import Path

import numpy as np
import torch

from ds_face.bench import markdown_table


def naive_pil_batches(rec_dir: Path, samples: int, batch: int):
    from PIL import Image

    from data_prep.recordio import RecordReader, detect_layout, read_idx
    reader = RecordReader(rec_dir / "train.rec")
    idx = read_idx(rec_dir / "train.idx")
    keys = detect_layout(reader, idx).image_keys[:samples]
    offsets = dict(idx)
    rng = random.Random(0)
    rng.shuffle(keys)
    images, labels = [], []
    for key in keys:
        _, label, _, _, jpeg = reader.read_image_record(offsets[key], key)
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tensor = torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)  # ToTensor
        images.append((tensor - 0.5) / 0.5)  # Normalize(mean=0.5, std=0.5)
        labels.append(int(label[0]))
        if len(images) == batch:
            yield {"image": torch.stack(images), "label": torch.tensor(labels)}
            images, labels = [], []


def arrow_batches(arrow_dir: Path, samples: int, batch: int, workers: int):
    """Built here, before the timer starts: opening the dataset is once per run, not per sample."""
    from ds_face.data import ArrowFaces, Loader
    from ds_face.data.order import Layout
    loader = Loader(ArrowFaces(arrow_dir), Layout(batch, 1, 1), num_workers=workers)
    return loader.micro_batches(0, -(-samples // batch) * batch)


def decode_only(rec_dir: Path, samples: int, decoder: str):
    """Just the JPEG decode of the same records, to choose the decoder: PIL vs simplejpeg."""
    from PIL import Image

    from data_prep.recordio import RecordReader, detect_layout, read_idx
    from ds_face.data.arrow import decode_rgb
    reader = RecordReader(rec_dir / "train.rec")
    idx = read_idx(rec_dir / "train.idx")
    offsets = dict(idx)
    jpegs = [reader.read_image_record(offsets[key], key)[4] for key in detect_layout(reader, idx).image_keys[:samples]]
    decode = decode_rgb if decoder == "simplejpeg" else \
        (lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))

    def batches():
        for start in range(0, len(jpegs), 128):
            chunk = [decode(data) for data in jpegs[start:start + 128]]
            yield {"image": torch.empty(len(chunk), 3, 112, 112), "label": torch.zeros(len(chunk))}
    return batches()


def timed(batches) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for out in batches:
        assert out["image"].dtype == torch.float32 and out["image"].shape[1:] == (3, 112, 112)
        n += len(out["label"])
    return time.perf_counter() - start, n


def warm(paths) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ds_face.bench.loader", description=__doc__.splitlines()[0])
    p.add_argument("--rec-dir", type=Path, required=True, help="holds train.rec, train.idx")
    p.add_argument("--arrow-dir", type=Path, required=True, help="the same data converted by data_prep")
    p.add_argument("--samples", type=int, default=40_000, help="samples per variant")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="loader workers of the last variant")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warm([args.rec_dir / "train.rec", *sorted(args.arrow_dir.glob("*.arrow"))])
    variants = {"decode only: PIL": lambda: decode_only(args.rec_dir, args.samples, "PIL"),
                "decode only: simplejpeg (ds_face)": lambda: decode_only(args.rec_dir, args.samples, "simplejpeg"),
                "naive PIL loop, 1 process": lambda: naive_pil_batches(args.rec_dir, args.samples, args.batch),
                "ds_face ArrowFaces, 0 workers (1 process)":
                    lambda: arrow_batches(args.arrow_dir, args.samples, args.batch, 0),
                f"ds_face ArrowFaces, {args.workers} workers":
                    lambda: arrow_batches(args.arrow_dir, args.samples, args.batch, args.workers)}
    results = {name: timed(make()) for name, make in variants.items()}
    naive_rate = results["naive PIL loop, 1 process"][1] / results["naive PIL loop, 1 process"][0]
    rows = [[name, n, f"{seconds:.1f}", f"{n / seconds:.0f}", f"{n / seconds / naive_rate:.2f}"]
            for name, (seconds, n) in results.items()]
    print(f"{args.samples} samples of {args.rec_dir / 'train.rec'}, batch {args.batch}, warm page cache\n")
    print(markdown_table(["variant", "samples", "seconds", "samples/s", "vs naive"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
