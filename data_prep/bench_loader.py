"""Training-loader throughput, side by side in one run: ds_face's Arrow loader against decoding alone, against
itself with more workers, and against a naive one-record-at-a-time PIL loop, on the same images.

    python -m data_prep.bench_loader --rec-dir DIR --arrow-dir DIR [--samples 40000] [--batch 128] [--workers 2]

* decode only (simplejpeg / PIL): the JPEG decode alone of the same records into one preallocated array, in
  this process: the ceiling a loader on one core can reach.
* ds_face Loader, 0 workers: in this process, so that the figure is per core: the run's order, rows read
  from memory-mapped shards, decoded into the uint8 batch, flipped. What the training step receives
  (it normalises on the device).
* ds_face Loader, 1 and N workers: DataLoader workers build micro-batches in parallel (how training runs);
  N / 1 is the scaling, bounded by the cores here.
* naive PIL loop: what arcface_torch's MXFaceDataset does per sample: read a record by its .idx offset,
  unpack, PIL decode, random flip, ToTensor + Normalize per image, then stack a batch (float32 out).

Run `python -m data_prep.bench_convert` first: it generates the >= 1 GB .rec and its Arrow conversion, and
prints where. Each variant reads the same number of samples; files are read once before timing (warm cache).
"""
from __future__ import annotations

import argparse
import os
import io
import random
import time
from pathlib import Path

import numpy as np
import torch

from ds_face.runtime.markdown import markdown_table


def naive_pil_batches(rec_dir: Path, samples: int, batch: int):
    from PIL import Image

    from data_prep.recordio import RecordReader, detect_layout, read_idx
    reader = RecordReader(rec_dir / "train.rec")
    idx = read_idx(rec_dir / "train.idx")
    keys = detect_layout(reader, *zip(*idx)).image_keys[:samples].tolist()
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
    from ds_face.data.order import BatchLayout
    loader = Loader(ArrowFaces(arrow_dir), BatchLayout(batch, 1, 1), num_workers=workers)
    return loader.micro_batches(0, -(-samples // batch) * batch)


def decode_only(rec_dir: Path, samples: int, decoder: str):
    """Just the JPEG decode of the same records, to choose the decoder: PIL vs simplejpeg."""
    from PIL import Image

    from data_prep.recordio import RecordReader, detect_layout, read_idx
    from ds_face.data.arrow import decode_rgb
    reader = RecordReader(rec_dir / "train.rec")
    idx = read_idx(rec_dir / "train.idx")
    offsets = dict(idx)
    jpegs = [reader.read_image_record(offsets[key], key)[4] for key in detect_layout(reader, *zip(*idx)).image_keys[:samples].tolist()]
    decode = decode_rgb if decoder == "simplejpeg" else \
        (lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))

    def batches():
        out = np.empty((128, 112, 112, 3), np.uint8)
        for start in range(0, len(jpegs), 128):
            chunk = jpegs[start:start + 128]
            for i, data in enumerate(chunk):
                if decoder == "simplejpeg":
                    decode(data, out=out[i])
                else:
                    out[i] = decode(data)
            yield {"image": torch.from_numpy(out[:len(chunk)]), "label": torch.zeros(len(chunk))}
    return batches()


def timed(batches) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for out in batches:
        assert out["image"].shape[1:] in ((3, 112, 112), (112, 112, 3))
        n += len(out["label"])
    return time.perf_counter() - start, n


def warm(paths) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="data_prep.bench_loader", description=__doc__.splitlines()[0])
    p.add_argument("--rec-dir", type=Path, required=True, help="holds train.rec, train.idx")
    p.add_argument("--arrow-dir", type=Path, required=True, help="the same data converted by data_prep")
    p.add_argument("--samples", type=int, default=40_000, help="samples per variant")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="loader workers of the last variant")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import datasets  # noqa: F401 - imports are once per run, not per sample: outside the timers
    from deepspeed.accelerator import get_accelerator
    get_accelerator()
    warm([args.rec_dir / "train.rec", *sorted(args.arrow_dir.glob("*.arrow"))])
    n = args.workers
    variants = {"decode only: PIL": lambda: decode_only(args.rec_dir, args.samples, "PIL"),
                "decode only: simplejpeg": lambda: decode_only(args.rec_dir, args.samples, "simplejpeg"),
                "naive PIL loop, 1 process": lambda: naive_pil_batches(args.rec_dir, args.samples, args.batch),
                "ds_face Loader, 0 workers (1 process)":
                    lambda: arrow_batches(args.arrow_dir, args.samples, args.batch, 0),
                "ds_face Loader, 1 worker": lambda: arrow_batches(args.arrow_dir, args.samples, args.batch, 1),
                f"ds_face Loader, {n} workers": lambda: arrow_batches(args.arrow_dir, args.samples, args.batch, n)}
    results = {name: timed(make()) for name, make in variants.items()}
    rate = {name: count / seconds for name, (seconds, count) in results.items()}
    decode, naive = rate["decode only: simplejpeg"], rate["naive PIL loop, 1 process"]
    rows = [[name, n_samples, f"{seconds:.1f}", f"{rate[name]:.0f}", f"{rate[name] / decode:.2f}",
             f"{rate[name] / naive:.2f}"] for name, (seconds, n_samples) in results.items()]
    print(f"{args.samples} samples of {args.rec_dir / 'train.rec'}, batch {args.batch}, warm page cache, "
          f"{os.cpu_count()} CPUs\n")
    print(markdown_table(["variant", "samples", "seconds", "samples/s", "vs decode only", "vs naive"], rows))
    print(f"\nper core: Loader (0 workers) / decode only = {rate['ds_face Loader, 0 workers (1 process)'] / decode:.2f}; "
          f"{n} workers / 1 worker = {rate[f'ds_face Loader, {n} workers'] / rate['ds_face Loader, 1 worker']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
