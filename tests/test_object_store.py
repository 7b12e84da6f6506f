"""Shards in object storage (``data.path: s3://...``) behind this node's bounded cache, against a real S3 server
on loopback (moto's, tests/object_store.py) through the real client (s3fs): the same run as from local shards
(losses bit for bit, each sample once across a 2 -> 3 resize, exact resume), a store that goes down mid-epoch
and comes back (the run waits) or stays down (the run stops, `latest` resumes), a shard replaced in the store
(named), a cache smaller than one step's shards (refused, the minimum named), and a manifest's names kept
inside the prefix. Real gloo ranks and DeepSpeed engines; nothing mocked."""
import functools
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_face.config import DataConfig
from ds_face.data.arrow import ArrowFaces, DataError
from ds_face.data.loader import Loader
from ds_face.data.order import BatchLayout
from ds_face.data.shards import ShardError, check_shard_files, read_manifest
from ds_face.runtime.spawn import run_ranks
from tests import conftest, observe
from tests.conftest import in_turn, write_shards

CLASSES, SAMPLES, SHARDS = 10, 100, 10  # 10 shards of 10 rows; 2 streams: a step reads 2-4 shards
make_trainer = functools.partial(conftest.make_trainer, classes=CLASSES, sample_rate=0.5, epochs=2,
                                 warmup_epochs=0.5, clip=5.0)


@pytest.fixture(scope="module")
def dataset(s3, tmp_path_factory):
    """The same shards on local disk and in the store; the largest shard's size."""
    local = tmp_path_factory.mktemp("local") / "arrow"
    write_shards(local, SAMPLES, SHARDS, num_classes=CLASSES)
    url = s3.upload(local, "runs/faces-v1")
    largest = max(s.bytes for s in read_manifest(local).shards)
    return local, url, largest


def data(path, cache=None, shards_held=None, outage_minutes=10.0, workers=1):
    """A run's data section: local shards, or the store's through ``cache`` holding ``shards_held`` shards."""
    extra = {} if cache is None else dict(cache_dir=str(cache), cache_gb=shards_held,
                                          store_outage_minutes=outage_minutes)
    return DataConfig(source="arrow", path=str(path), num_workers=workers, streams=2, **extra)


def _run(rank, world_size, out, data_config, max_steps=None, resume=False, stage=2):
    trainer = make_trainer(world_size, out, stage, max_steps=max_steps, data=data_config)
    if resume:
        trainer.resume()
    steps = observe.fit(trainer)
    return {"losses": steps.losses, "ledger": steps.ledger, "samples": trainer.position.samples}


def test_object_store_trains_as_local_shards_with_exact_resume_and_a_2_to_3_resize(dataset, tmp_path):
    local, url, largest = dataset
    held = 6 * largest / 2**30  # a 6-shard cache: shards are evicted and fetched again as the run moves on
    cache = tmp_path / "node-cache"  # one node: its ranks share it
    two = {"local": (_run, (tmp_path / "local", data(local))),
           "store": (_run, (tmp_path / "store", data(url, cache, held))),
           "local-cut": (_run, (tmp_path / "local-cut", data(local), 3)),
           "store-cut": (_run, (tmp_path / "store-cut", data(url, cache, held), 3))}
    first = run_ranks(2, in_turn, two, timeout=300.0 * len(two))
    shutil.copytree(tmp_path / "store-cut", tmp_path / "store-cut-again")  # one save, resumed twice
    three = {"local-resized": (_run, (tmp_path / "local-cut", data(local), None, True)),
             "store-resized": (_run, (tmp_path / "store-cut", data(url, cache, held), None, True))}
    resized = run_ranks(3, in_turn, three, timeout=300.0 * len(three))
    again = run_ranks(2, _run, tmp_path / "store-cut-again", data(url, cache, held), None, True)

    for rank in first:  # the store gives the local run, bit for bit
        assert rank["store"]["losses"] == rank["local"]["losses"] and len(rank["local"]["losses"]) == 12
        assert torch.equal(rank["store"]["ledger"], rank["local"]["ledger"])
    for rank, before in zip(again, first):  # exact resume from the store
        assert rank["losses"] == before["store"]["losses"][3:]
    for rank in resized:  # the 2 -> 3 resize: the same losses as from local shards
        assert rank["store-resized"]["losses"] == rank["local-resized"]["losses"]
    trained = torch.cat([r["store-cut"]["ledger"] for r in first] + [r["store-resized"]["ledger"] for r in resized],
                        dim=1)
    epoch0, epoch1 = trained[1][trained[0] == 0], trained[1][trained[0] == 1]
    assert sorted(epoch0.tolist()) == list(range(SAMPLES))  # every sample once across the resize
    assert len(set(epoch1.tolist())) == len(epoch1) == 92
    cached = sorted(p.name for p in next(cache.iterdir()).glob("*.arrow"))
    assert 0 < len(cached) <= 6, "the cache holds at most its budget"


def _through_an_outage(rank, world_size, out, data_config, signals):
    """Train; at step 3 rank 0 asks the test to stop the store and waits until it is down."""
    signals = Path(signals)

    def at_step(report):
        if report.step == 3 and rank == 0:
            (signals / "stop").touch()
            while not (signals / "stopped").exists():
                time.sleep(0.05)

    trainer = make_trainer(world_size, out, 2, data=data_config, every=2)
    recorder = observe.Recorder()
    try:
        trainer.fit(on_step=lambda report: (recorder(report), at_step(report)))
    except DataError as err:
        return {"error": str(err), "losses": recorder.losses}
    store = trainer.loader.source.cache.store
    return {"error": None, "losses": recorder.losses, "retries": store.stats.retries}


def _outage(s3, signals: Path, seconds: float | None):
    """The test's side: when asked, stop the store; bring it back after ``seconds`` (None: never)."""
    while not (signals / "stop").exists():
        time.sleep(0.05)
    s3.stop()
    (signals / "stopped").touch()
    if seconds is not None:
        time.sleep(seconds)
        s3.start()


def test_object_store_down_mid_epoch_the_run_waits_and_continues(s3, dataset, tmp_path):
    local, url, largest = dataset
    signals = tmp_path / "signals"
    signals.mkdir()
    side = threading.Thread(target=_outage, args=(s3, signals, 4.0))
    side.start()
    try:  # workers 0: the fetches (and their retries) happen in the rank's own process, where they are counted
        results = run_ranks(2, _through_an_outage, tmp_path / "run",
                            data(url, tmp_path / "cache", 4 * largest / 2**30, workers=0), str(signals))
    finally:
        side.join()
        if s3.server is None:
            s3.start()
    reference = run_ranks(2, _run, tmp_path / "local", data(local, workers=0))
    for got, want in zip(results, reference):
        assert got["error"] is None
        assert got["losses"] == want["losses"], "the same run, outage or not"
    assert sum(r["retries"] for r in results) > 0, "the store was down while the run needed it"


def test_object_store_down_longer_than_the_setting_stops_cleanly_and_latest_resumes(s3, dataset, tmp_path):
    local, url, largest = dataset
    signals = tmp_path / "signals"
    signals.mkdir()
    side = threading.Thread(target=_outage, args=(s3, signals, None))
    side.start()
    tiny_cache = 3 * largest / 2**30
    try:  # 3 s of outage allowed; the store stays down
        down = run_ranks(1, _through_an_outage, tmp_path / "run",
                         data(url, tmp_path / "cache", tiny_cache, outage_minutes=0.05, workers=0), str(signals))[0]
    finally:
        side.join()
        s3.start()
    assert down["error"] is not None
    assert f"{url}/data-" in down["error"] and "the store has not answered for" in down["error"], down["error"]
    assert "data.store_outage_minutes is 0.05" in down["error"]
    # `latest` is a step the run saved before the outage; the store is back: resuming it finishes the run
    resumed = run_ranks(1, _run, tmp_path / "run", data(url, tmp_path / "cache", tiny_cache, workers=0), None, True)
    assert len(down["losses"]) + len(resumed[0]["losses"]) >= 12


def _layout(world_size=1):
    return BatchLayout(micro_batch=8, accumulation=1, world_size=world_size)


def test_object_store_a_shard_replaced_in_the_store_is_named(s3, dataset, tmp_path):
    local, _, _ = dataset
    url = s3.upload(local, "runs/replaced")
    name = read_manifest(local).shards[3].file
    original = (local / name).read_bytes()
    forged = bytearray(original)
    forged[-20:] = b"x" * 20  # same size, other bytes: only the sha256 tells
    s3.filesystem().pipe_file(f"{s3.bucket}/runs/replaced/{name}", bytes(forged))
    source = ArrowFaces(url, cache_dir=tmp_path / "cache", cache_gb=1.0)
    with pytest.raises(DataError, match=rf"{url}/{name}: sha256 [0-9a-f]{{64}}, the manifest says [0-9a-f]{{64}}: "
                                        r"the shard changed in the store since the dataset was written"):
        source.make(np.zeros(10, np.int64), np.arange(30, 40))
    assert not list((tmp_path / "cache").rglob(f"{name}*.partial")), "a refused download leaves nothing"
    s3.filesystem().pipe_file(f"{s3.bucket}/runs/replaced/{name}", original[:-1])  # one byte short
    with pytest.raises(ShardError, match=rf"{url}/{name} \(shards\[3\] of {url}/manifest.json\): {len(original) - 1} "
                                         rf"bytes in the store, the manifest says {len(original)}"):
        check_shard_files(read_manifest(url), url)  # the pre-flight, before any rank starts


def test_object_store_cache_smaller_than_one_step_is_refused_with_the_minimum(dataset, tmp_path):
    _, url, largest = dataset
    loader = Loader(ArrowFaces(url, cache_dir=tmp_path / "cache", cache_gb=largest / 2**30), _layout(2),
                    streams=2)
    with pytest.raises(DataError, match=r"data.cache_gb is [0-9.e-]+ GiB, smaller than the shards one optimizer step "
                                        r"reads \([0-9.e-]+ GiB at sample 0\); set data.cache_gb to at least"):
        next(loader.micro_batches(0, 64))


def test_object_store_manifest_names_stay_inside_the_prefix(s3, dataset, tmp_path):
    local, _, _ = dataset
    url = s3.upload(local, "runs/escape")
    manifest = (local / "manifest.json").read_text()
    first = read_manifest(local).shards[0].file
    fs = s3.filesystem()
    fs.pipe_file(f"{s3.bucket}/runs/escape/manifest.json", manifest.replace(first, f"../faces-v1/{first}").encode())
    with pytest.raises(ShardError, match=r"is a path; shards must be plain file names inside the dataset directory"):
        read_manifest(url)
    fs.rm_file(f"{s3.bucket}/runs/escape/manifest.json")
    with pytest.raises(ShardError, match=rf"{url}/manifest.json: not found; is {url} a dataset written by data_prep"):
        read_manifest(url)
    assert os.environ["AWS_ENDPOINT_URL_S3"] == s3.endpoint  # the client found the store through its environment


def _take_the_lock(cache, name):
    with cache._locked(name):
        pass


def test_object_store_a_forked_reader_never_inherits_a_shard_lock(dataset, tmp_path):
    """A DataLoader worker forked while the prefetcher holds a shard's lock (a flock belongs to the open file,
    which a fork shares) must not keep it: once the parent lets go, the child takes it."""
    import multiprocessing
    _, url, _ = dataset
    cache = ArrowFaces(url, cache_dir=tmp_path / "cache", cache_gb=1.0).cache
    name = read_manifest(url).shards[0].file + ".lock"
    with cache._locked(name):
        child = multiprocessing.get_context("fork").Process(target=_take_the_lock, args=(cache, name))
        child.start()  # forked while the lock is held
    child.join(60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0, "the forked child still waits for a lock nobody holds"


def test_object_store_links_planted_in_the_cache_are_never_read_or_followed(dataset, tmp_path):
    """A shard or sidecar in the node cache that is a link (to a right-looking file, or to a device that never
    ends) is not taken for a fetched shard: the shard is fetched again, the link replaced, its target untouched."""
    local, url, _ = dataset
    source = ArrowFaces(url, cache_dir=tmp_path / "cache", cache_gb=1.0)
    info = source.manifest.shards[0]
    bait = tmp_path / "bait.arrow"
    shutil.copy(local / info.file, bait)
    directory = source.cache.directory
    os.symlink(bait, directory / info.file)
    os.symlink("/dev/zero", directory / (info.file + ".sha256"))
    path = source.cache.get(0)
    assert not os.path.islink(path) and (Path(path).read_bytes() == (local / info.file).read_bytes())
    assert bait.read_bytes() == (local / info.file).read_bytes() and source.cache.misses == 1


def test_object_store_an_unknown_protocol_is_named_by_the_preflight():
    with pytest.raises(ShardError, match=r"foo://bucket/x: no client for this protocol .*for s3:// install s3fs"):
        read_manifest("foo://bucket/x")
