"""The Arrow loader: every sample once per epoch across ranks x workers, the same micro-batches whatever the
worker count and (for one step) the world size, any start position, corrupt images, bad directories.
Real shard files, real `datasets` memory maps, real ranks.

Test images are PNGs (lossless) whose pixels spell out the sample's index: red/green = index, blue = the
column number, so a flipped image reads its columns backwards.
"""
import io
import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from ds_face.data.arrow import ArrowFaces, DataError, decode_rgb, flip_images, normalize
from ds_face.data.loader import Loader
from ds_face.data.order import BatchLayout, EpochOrder
from ds_face.data.seeds import flip_bits
from ds_face.data.shards import shard_name
from ds_face.runtime.spawn import run_ranks
from tests.conftest import index_png, write_shards


def flip_coin(seed: int, epoch: int, row: int) -> bool:
    """The flip of one sample, computed independently of ds_face (Python integers, splitmix64 as published):
    the reference every flip of the loader is checked against."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + row * 0x94D049BB133111EB) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return bool((x ^ (x >> 31)) & 1)


def decode_batch(batch) -> tuple[list[int], list[bool]]:
    """(sample indices, flipped?) of a loader batch (uint8 [B, H, W, 3])."""
    pixels = batch["image"].to(torch.int64)
    index = (pixels[:, 0, 0, 0] * 256 + pixels[:, 0, 0, 1]).tolist()
    flipped = (pixels[:, 0, 0, 2] == 111).tolist()
    return index, flipped


def make_loader(directory, micro_batch, accumulation=1, rank=0, world_size=1, workers=0, seed=2048, streams=4,
                on_corrupt="skip"):
    source = ArrowFaces(directory, seed=seed, on_corrupt=on_corrupt)
    return Loader(source, BatchLayout(micro_batch, accumulation, world_size, rank), streams=streams, seed=seed,
                  num_workers=workers)


def epoch_indices(loader, epoch=0) -> list[list[int]]:
    """The sample numbers (decoded from the pixels) of each micro-batch of one epoch's whole steps."""
    n, g = loader.epoch_size, loader.layout.global_batch
    return [decode_batch(batch)[0] for batch in loader.micro_batches(epoch * n, epoch * n + n // g * g)]


@pytest.fixture(scope="module")
def dataset_1000(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("arrow") / "ds", 1000, 8)


def test_epoch_order_is_a_seeded_permutation_that_mixes_the_streams():
    rows = [13, 13, 12, 12, 12, 12, 12]  # 86 rows, shards of unequal size
    order = EpochOrder(rows, streams=3, seed=1, epoch=0)
    everything = order.rows(np.arange(86))
    assert sorted(everything.tolist()) == list(range(86))
    assert (np.concatenate([order.rows(np.arange(i, min(i + 5, 86))) for i in range(0, 86, 5)]) == everything).all()
    assert (EpochOrder(rows, 3, 1, 0).rows(np.arange(86)) == everything).all()
    assert not (EpochOrder(rows, 3, 1, 1).rows(np.arange(86)) == everything).all()
    assert not (EpochOrder(rows, 3, 2, 0).rows(np.arange(86)) == everything).all()
    shard_of = np.searchsorted(np.cumsum(rows), everything, side="right")
    assert len(set(shard_of[:6].tolist())) == 3  # consecutive samples come from the 3 streams' shards in turn


def test_flip_images_mirrors_exactly_the_chosen_images():
    images = np.random.default_rng(0).integers(0, 256, (5, 7, 6, 3), dtype=np.uint8)
    before = images.copy()
    flip_images(images, np.array([1, 4]))
    assert np.array_equal(images[[1, 4]], before[[1, 4], :, ::-1])  # width reversed, each pixel's RGB kept
    assert np.array_equal(images[[0, 2, 3]], before[[0, 2, 3]])


def test_flip_bits_is_flip_coin_for_many():
    epochs, rows = np.repeat(np.arange(3), 400), np.tile(np.arange(400), 3) * 7919
    assert flip_bits(5, epochs, rows).tolist() == [flip_coin(5, e, r) for e, r in zip(epochs.tolist(), rows.tolist())]


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


def test_arrow_rows_are_recognised_as_jpeg(tmp_path):
    """Rows reach the decoder as memoryviews over the mapped shard. A plain memoryview of an Arrow buffer is
    of signed chars (0xff reads -1, never equal to the JPEG marker's bytes), which once sent every row to
    PIL instead of libjpeg-turbo's faster path."""
    from ds_face.images import is_jpeg
    jpeg = io.BytesIO()
    Image.new("RGB", (112, 112), (10, 20, 30)).save(jpeg, format="JPEG")
    directory = write_shards(tmp_path / "ds", 4, 1, images={i: jpeg.getvalue() for i in range(4)})
    rows = ArrowFaces(directory)._shard(0)
    views = rows.images(np.arange(4))
    assert all(view.format == "B" and is_jpeg(view) for view in views)
    assert not is_jpeg(memoryview(index_png(0)))


@pytest.mark.parametrize("workers", [0, 2])
def test_one_rank_sees_every_sample_once_with_flips(dataset_1000, workers):
    loader = make_loader(dataset_1000, 25, workers=workers)
    seen, flips = [], []
    n = 0
    for batch in loader.micro_batches(0, 1000):
        assert batch["image"].shape == (25, 112, 112, 3) and batch["image"].dtype == torch.uint8
        index, flipped = decode_batch(batch)
        assert batch["label"].tolist() == [i % 10 for i in index]
        assert batch["sample"].tolist() == index  # test shards: sample i is dataset row i
        assert batch["epoch"].tolist() == [0] * 25
        seen += index
        flips += [f == flip_coin(2048, 0, i) for i, f in zip(index, flipped)]
        n += 1
    assert n == 40 and sorted(seen) == list(range(1000))
    assert all(flips) and 350 < sum(flip_coin(2048, 0, i) for i in range(1000)) < 650
    assert seen != sorted(seen)  # shuffled


def test_the_micro_batches_do_not_depend_on_the_worker_count(dataset_1000):
    assert epoch_indices(make_loader(dataset_1000, 30, workers=0)) == \
        epoch_indices(make_loader(dataset_1000, 30, workers=1)) == \
        epoch_indices(make_loader(dataset_1000, 30, workers=2))


def test_epochs_reshuffle_and_repeat_for_a_seed(dataset_1000):
    def order(epoch, seed=2048):
        return sum(epoch_indices(make_loader(dataset_1000, 50, seed=seed), epoch), [])
    first = order(0)
    assert first == order(0)
    assert sorted(order(1)) == sorted(first) and order(1) != first
    assert order(0, seed=7) != first


def test_a_step_holds_the_same_micro_batches_on_2_ranks_as_on_1_rank_accumulating_2(dataset_1000):
    one = epoch_indices(make_loader(dataset_1000, 20, accumulation=2))
    ranks = [epoch_indices(make_loader(dataset_1000, 20, rank=r, world_size=2)) for r in range(2)]
    assert [batch for pair in zip(*ranks) for batch in pair] == one  # slot k = micro_step x W + rank


def test_a_pass_from_any_position_continues_the_uninterrupted_one(dataset_1000):
    whole = make_loader(dataset_1000, 16)
    uninterrupted = [decode_batch(b)[0] for b in whole.micro_batches(0, 3000)]  # 3 epochs: crosses 2 ends
    assert len(uninterrupted) == 187  # 3000 // 16
    rest = [decode_batch(b)[0] for b in make_loader(dataset_1000, 16, workers=2).micro_batches(16 * 70, 3000)]
    assert rest == uninterrupted[70:]
    # an epoch's end inside a micro-batch: 1000 = 62 x 16 + 8, so batch 62 holds epoch 0's last 8 and epoch 1's first 8
    epochs = [b["epoch"].tolist() for b in whole.micro_batches(62 * 16, 63 * 16)]
    assert epochs == [[0] * 8 + [1] * 8]


def _rank_epochs(rank, world_size, directory, micro_batch, workers, epochs):
    loader = make_loader(directory, micro_batch, 2, rank, world_size, workers=workers)
    return {"epochs": [epoch_indices(loader, epoch) for epoch in range(epochs)]}


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
    # 7 shards of 143 or 144 rows, a count that does not divide by ranks x workers: nothing to configure.
    directory = write_shards(tmp_path / "ds", 1003, 7)
    results = run_ranks(2, _rank_epochs, str(directory), 20, 2, 1)
    per_rank = [r["epochs"][0] for r in results]
    assert len(per_rank[0]) == len(per_rank[1]) == 1003 // 80 * 2  # whole steps of 2 ranks x 2 x 20
    everything = Counter(i for batches in per_rank for batch in batches for i in batch)
    assert max(everything.values()) == 1 and len(everything) == 1003 // 80 * 80


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_counted_and_replaced(tmp_path, workers):
    broken_png = index_png(150)[:60]  # a PNG cut short: an image of ours, damaged
    directory = write_shards(tmp_path / "ds", 200, 4, images={7: b"\xff\xd8\xff broken", 150: broken_png})
    loader = make_loader(directory, 20, workers=workers)
    batches = epoch_indices(loader)
    assert len(batches) == 10 and loader.corrupt_images == 2
    seen = Counter(i for batch in batches for i in batch)
    assert 7 not in seen and 150 not in seen and sum(seen.values()) == 200
    assert sorted(seen.values())[-2:] == [2, 2]  # two good samples stood in for the broken ones


def test_corrupt_image_fails_when_configured(tmp_path):
    directory = write_shards(tmp_path / "ds", 40, 1, images={3: b"\xff\xd8\xff broken"})
    loader = make_loader(directory, 20, on_corrupt="fail")
    with pytest.raises(DataError, match=r"data-00000-of-00001\.arrow, row 3 \(dataset row 3, label 3\): cannot "
                                        r"decode image"):
        epoch_indices(loader)


def test_wrong_image_size_is_a_corrupt_sample(tmp_path):
    small = io.BytesIO()
    Image.new("RGB", (96, 112)).save(small, format="PNG")
    directory = write_shards(tmp_path / "ds", 40, 1, images={5: small.getvalue()})
    loader = make_loader(directory, 20, on_corrupt="fail")
    with pytest.raises(DataError, match="dataset row 5.*image is 96x112, expected 112x112"):
        epoch_indices(loader)


def test_bad_directories(tmp_path, dataset_1000):
    with pytest.raises(DataError, match=r"manifest.json: not found.*never finished leaves no manifest"):
        ArrowFaces(tmp_path)
    copy = write_shards(tmp_path / "gone", 100, 2)
    os.remove(copy / shard_name(1, 2))
    with pytest.raises(DataError, match=r"data-00001-of-00002.arrow: listed in .*manifest.json but not found"):
        ArrowFaces(copy)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad/manifest.json: not valid JSON"):
        ArrowFaces(tmp_path / "bad")
    short = write_shards(tmp_path / "short", 100, 2)
    manifest = (short / "manifest.json").read_text().replace('"num_samples": 100', '"num_samples": 120', 1)
    (short / "manifest.json").write_text(manifest.replace('"rows": 50', '"rows": 60'))
    with pytest.raises(DataError, match=r"data-0000[01]-of-00002.arrow \(shards\[[01]\] of .*manifest.json\): "
                                         r"holds 50 rows, the manifest says 60"):
        epoch_indices(make_loader(short, 20))
    empty = write_shards(tmp_path / "empty", 100, 2)
    (empty / shard_name(0, 2)).write_bytes(b"")
    with pytest.raises(DataError, match=r"data-00000-of-00002.arrow \(shards\[0\] of .*\): 0 bytes, the manifest "
                                        r"says \d+: empty"):
        epoch_indices(make_loader(empty, 20))


def _rank_labels_by_index(rank, world_size, directory):
    loader = make_loader(directory, 16, rank=rank, world_size=world_size, workers=2)
    out = []
    for batch in loader.micro_batches(0, 512):
        index, flipped = decode_batch(batch)
        out += list(zip(index, batch["label"].tolist(), flipped, batch["sample"].tolist()))
    return out


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
    seen = sorted(item[:2] for items in per_rank for item in items)
    assert seen == sorted((n, n % 7) for n in range(512))
    assert all(flipped == flip_coin(2048, 0, row) for items in per_rank for _, _, flipped, row in items)
