"""The streaming Arrow loader: every sample once per epoch across ranks x workers, equal batches on every
rank, resumable position, corrupt images, bad directories. Real shard files, real `datasets`, real ranks.

Test images are PNGs (lossless) whose pixels spell out the sample's index: red/green = index, blue = the
column number, so a flipped image reads its columns backwards.
"""
import io
import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from ds_face.data.arrow import ArrowFaces, DataError, count_streams, decode_rgb, flip_coin, normalize
from ds_face.data.shards import SCHEMA, Manifest, ShardInfo, rows_per_shard, sha256_of, shard_name
from tests.multirank import run_ranks


def index_png(index: int) -> bytes:
    pixels = np.zeros((112, 112, 3), np.uint8)
    pixels[..., 0], pixels[..., 1] = index // 256, index % 256
    pixels[..., 2] = np.arange(112)[None, :]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write_shards(directory, num_samples: int, num_shards: int, num_classes: int = 10, images=None):
    """Shards exactly as ds_face/data/shards.py specifies; sample i has label i % num_classes."""
    os.makedirs(directory, exist_ok=True)
    images = images or {}
    infos, start = [], 0
    for s, rows in enumerate(rows_per_shard(num_samples, num_shards)):
        path = os.path.join(directory, shard_name(s, num_shards))
        index = list(range(start, start + rows))
        table = pa.table({"image": [images.get(i) or index_png(i) for i in index],
                          "label": [i % num_classes for i in index], "index": index}, schema=SCHEMA)
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
            writer.write_table(table, max_chunksize=64)
        infos.append(ShardInfo(shard_name(s, num_shards), rows, os.path.getsize(path), sha256_of(path)))
        start += rows
    Manifest(num_samples=num_samples, num_classes=num_classes, shards=infos).write(directory)
    return directory


def decode_batch(batch) -> tuple[list[int], list[bool]]:
    """(sample indices, flipped?) of a loader batch."""
    pixels = ((batch["image"] + 1) * 127.5).round().to(torch.int64)
    index = (pixels[:, 0, 0, 0] * 256 + pixels[:, 1, 0, 0]).tolist()
    flipped = (pixels[:, 2, 0, 0] == 111).tolist()
    return index, flipped


def epoch_indices(loader) -> list[list[int]]:
    return [decode_batch(batch)[0] for batch in loader]


@pytest.fixture(scope="module")
def dataset_1000(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("arrow") / "ds", 1000, 8)


def test_count_streams():
    counts = count_streams(1000, 8, micro_batch=32, accumulation=1, world_size=2, num_workers=2)
    assert (counts.streams, counts.rows_per_stream, counts.micro_batches) == (4, 250, 15)  # floor(500/32)
    exact = count_streams(1024, 8, micro_batch=32, accumulation=2, world_size=2, num_workers=2)
    assert exact.steps_per_epoch == 1024 // (32 * 2 * 2)  # equal shards: floor(samples / global batch)
    uneven = count_streams(1003, 8, micro_batch=10, accumulation=1, world_size=2, num_workers=1)
    assert uneven.rows_per_stream == 4 * 125  # the 3 shards with a spare row may go to either rank
    with pytest.raises(DataError, match=r"12 shards cannot be dealt out evenly to 2 ranks x 4 loader workers.*"
                                        r"data.num_workers to one of \[1, 2, 3, 6\]"):
        count_streams(1200, 12, 32, 1, world_size=2, num_workers=4)


def test_normalize_matches_arcface_torch():
    images = torch.randint(0, 256, (2, 112, 112, 3), dtype=torch.uint8)
    expected = (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5  # ToTensor, Normalize(0.5, 0.5)
    out = normalize(images)
    assert out.is_contiguous() and out.shape == (2, 3, 112, 112)
    torch.testing.assert_close(out, expected)


def test_jpeg_decodes_like_pil():
    pixels = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", quality=90)
    fast = decode_rgb(jpeg.getvalue())
    pil = np.asarray(Image.open(io.BytesIO(jpeg.getvalue())).convert("RGB"))
    assert fast.shape == (112, 112, 3) and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - pil.astype(int)).max() <= 2  # same libjpeg-turbo, IDCT may differ by 1


@pytest.mark.parametrize("workers", [0, 2])
def test_one_rank_sees_every_sample_once_with_flips(dataset_1000, workers):
    loader = ArrowFaces(dataset_1000, 25, 1, rank=0, world_size=1, num_workers=workers, shuffle_buffer=100)
    assert len(loader) == loader.steps_per_epoch == 40
    seen, flips = [], []
    for batch in loader:
        assert batch["image"].shape == (25, 3, 112, 112) and batch["image"].dtype == torch.float32
        index, flipped = decode_batch(batch)
        assert batch["label"].tolist() == [i % 10 for i in index]
        seen += index
        flips += [f == flip_coin(2048, 0, i) for i, f in zip(index, flipped)]
    assert sorted(seen) == list(range(1000))
    assert all(flips) and 350 < sum(flip_coin(2048, 0, i) for i in range(1000)) < 650
    assert seen != sorted(seen)  # shuffled


def test_epochs_reshuffle_and_repeat_for_a_seed(dataset_1000):
    def order(epoch, seed=2048):
        loader = ArrowFaces(dataset_1000, 50, 1, 0, 1, num_workers=0, seed=seed, shuffle_buffer=200)
        loader.set_epoch(epoch)
        return sum(epoch_indices(loader), [])
    first = order(0)
    assert first == order(0)
    assert sorted(order(1)) == sorted(first) and order(1) != first
    assert order(0, seed=7) != first


def _rank_epochs(rank, world_size, directory, micro_batch, workers, epochs):
    loader = ArrowFaces(directory, micro_batch, 2, rank, world_size, num_workers=workers, shuffle_buffer=64)
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        out.append(epoch_indices(loader))
    return {"epochs": out, "steps": loader.steps_per_epoch}


def test_two_ranks_two_workers_cover_the_epoch_exactly_once(tmp_path):
    directory = write_shards(tmp_path / "ds", 1024, 8)
    results = run_ranks(2, _rank_epochs, str(directory), 32, 2, 2)
    for epoch in range(2):
        per_rank = [r["epochs"][epoch] for r in results]
        assert [len(batches) for batches in per_rank] == [16, 16]  # 1024 / (32 x 2 ranks), whole steps of 2
        everything = [i for batches in per_rank for batch in batches for i in batch]
        assert sorted(everything) == list(range(1024))
    assert results[0]["epochs"][0] != results[0]["epochs"][1]


def test_uneven_shards_still_give_every_rank_the_same_batches(tmp_path):
    # 8 shards of 125 or 126 rows: ranks get different totals, but the same number of batches.
    directory = write_shards(tmp_path / "ds", 1003, 8)
    results = run_ranks(2, _rank_epochs, str(directory), 20, 2, 2)
    for epoch in range(2):
        per_rank = [r["epochs"][epoch] for r in results]
        assert len(per_rank[0]) == len(per_rank[1]) == results[0]["steps"] * 2 == 24  # floor(500/20), even
        everything = Counter(i for batches in per_rank for batch in batches for i in batch)
        assert max(everything.values()) == 1 and set(everything) <= set(range(1003))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_sees_exactly_the_rest(dataset_1000, workers):
    def loader():
        return ArrowFaces(dataset_1000, 30, 1, 0, 1, num_workers=workers, shuffle_buffer=100)
    full = loader()
    full.set_epoch(1)
    uninterrupted = epoch_indices(full)

    first = loader()
    first.set_epoch(1)
    done = []
    for batch in first:
        done.append(decode_batch(batch)[0])
        if len(done) == 11:
            break
    state = first.state_dict()
    assert state["epoch"] == 1 and state["micro_batches"] == 11

    second = loader()
    second.load_state_dict(state)
    rest = epoch_indices(second)
    assert len(done) + len(rest) == len(uninterrupted) == 33
    seen = [i for batch in done + rest for i in batch]
    assert len(set(seen)) == len(seen)
    assert sorted(seen) == sorted(i for batch in uninterrupted for i in batch)
    if workers == 0:  # one stream: the very same order as without the interruption
        assert done + rest == uninterrupted


def test_resume_with_another_world_size_skips_the_same_share(dataset_1000):
    loader = ArrowFaces(dataset_1000, 20, 1, 0, 1, num_workers=0, shuffle_buffer=10)
    state = {**loader.state_dict(), "world_size": 2, "micro_batches": 10}  # 2 ranks x 10 x 20 = 400 samples
    loader.load_state_dict(state)
    assert len(epoch_indices(loader)) == len(loader) - 20


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_counted_and_replaced(tmp_path, workers):
    directory = write_shards(tmp_path / "ds", 200, 4, images={7: b"\xff\xd8\xff broken", 150: b"not an image"})
    loader = ArrowFaces(directory, 20, 1, 0, 1, num_workers=workers, shuffle_buffer=0)
    batches = epoch_indices(loader)
    assert len(batches) == 10 and loader.corrupt_images == 2
    seen = Counter(i for batch in batches for i in batch)
    assert 7 not in seen and 150 not in seen and sum(seen.values()) == 200
    assert sorted(seen.values())[-2:] == [2, 2]  # two good samples stood in for the broken ones


def test_corrupt_image_fails_when_configured(tmp_path):
    directory = write_shards(tmp_path / "ds", 40, 1, images={3: b"\xff\xd8\xff broken"})
    loader = ArrowFaces(directory, 20, 1, 0, 1, num_workers=0, shuffle_buffer=0, on_corrupt="fail")
    with pytest.raises(DataError, match=r"sample index 3 \(label 3\): cannot decode image"):
        epoch_indices(loader)


def test_wrong_image_size_is_a_corrupt_sample(tmp_path):
    small = io.BytesIO()
    Image.new("RGB", (96, 112)).save(small, format="PNG")
    directory = write_shards(tmp_path / "ds", 40, 1, images={5: small.getvalue()})
    loader = ArrowFaces(directory, 20, 1, 0, 1, num_workers=0, shuffle_buffer=0, on_corrupt="fail")
    with pytest.raises(DataError, match="sample index 5.*image is 96x112, expected 112x112"):
        epoch_indices(loader)


def test_bad_directories(tmp_path, dataset_1000):
    with pytest.raises(DataError, match=r"manifest.json: not found.*never finished leaves no manifest"):
        ArrowFaces(tmp_path, 20, 1, 0, 1)
    copy = write_shards(tmp_path / "gone", 100, 2)
    os.remove(copy / shard_name(1, 2))
    with pytest.raises(DataError, match=r"data-00001-of-00002.arrow: listed in .*manifest.json but not found"):
        ArrowFaces(copy, 20, 1, 0, 1)
    (tmp_path / "bad" ).mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad/manifest.json: not valid JSON"):
        ArrowFaces(tmp_path / "bad", 20, 1, 0, 1)
    short = write_shards(tmp_path / "short", 100, 2)
    manifest = (short / "manifest.json").read_text().replace('"num_samples": 100', '"num_samples": 120', 1)
    (short / "manifest.json").write_text(manifest.replace('"rows": 50', '"rows": 60'))
    loader = ArrowFaces(short, 20, 1, 0, 1, num_workers=0, shuffle_buffer=0)
    with pytest.raises(DataError, match=r"ran out after 5 of 6 micro-batches.*data_prep.verify"):
        epoch_indices(loader)


def _rank_labels_by_index(rank, world_size, directory):
    loader = ArrowFaces(directory, 16, 1, rank, world_size, num_workers=2, shuffle_buffer=50)
    pairs = []
    for batch in loader:
        index, flipped = decode_batch(batch)
        pairs += list(zip(index, batch["label"].tolist(), flipped))
    return pairs


def test_recordio_round_trip_through_converter_and_two_ranks_two_workers(tmp_path):
    """InsightFace .rec (images whose pixels spell their number) -> rec2arrow -> 2 ranks x 2 workers: every
    record exactly once per epoch, with its source label, and flipped exactly when its coin says so."""
    from data_prep import rec2arrow
    from data_prep.recordio import write_insightface_rec
    images = [(n % 7, index_png(n)) for n in range(512)]  # sorted by label in the .rec, as InsightFace's
    write_insightface_rec(tmp_path / "rec", images, label_as_array=True)
    assert rec2arrow.main([str(tmp_path / "rec"), str(tmp_path / "arrow"), "--workers", "2", "--shards", "8"]) == 0
    per_rank = run_ranks(2, _rank_labels_by_index, str(tmp_path / "arrow"))
    assert len(per_rank[0]) == len(per_rank[1]) == 256
    seen = sorted(pair[:2] for pairs in per_rank for pair in pairs)
    assert seen == sorted((n, n % 7) for n in range(512))
    keys = {n: key for key, n in enumerate(sorted(range(512), key=lambda n: n % 7), 1)}  # .rec keys by label
    assert all(flipped == flip_coin(2048, 0, keys[n]) for pairs in per_rank for n, _, flipped in pairs)
