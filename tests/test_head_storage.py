"""Where the head lives (``head.storage``: device, host, disk) changes nothing but where: with float32 storage
the three give the same bits on real gloo ranks and real DeepSpeed engines, through a save, a resume (after
the disk's scratch directory is gone), a 2 -> 3 resize and a change of storage across it; and a disk that is
full, read-only or not a directory is named before the first step."""
import functools
import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from ds_face.checkpoint.files import head_slices, latest_tag, read_meta
from ds_face.config import HeadConfig, RunConfig
from ds_face.config.checks import check_run
from ds_face.head import storage_dir
from ds_face.head.storage import HeadStorageError, HeadStore
from ds_face.runtime.spawn import run_ranks
from tests import conftest, observe
from tests.conftest import RESUMABLE, in_turn, mount_tmpfs

STORAGES = ("device", "host", "disk")
CLASSES, EMBEDDING = RESUMABLE["classes"], 32
# 48 samples an epoch, 2 epochs: 6 steps on 2 ranks, 4 on 3; a checkpoint every 2 steps; sample_rate 0.5
make_trainer = functools.partial(conftest.make_trainer, **{**RESUMABLE, "samples": 48}, every=2)


def snapshot(trainer, recorded=()) -> dict:
    return {"losses": [r.loss for r in recorded], "step": trainer.global_step,
            "head": trainer.head.weight.clone(),
            "optimizer": {k: v.clone() for k, v in trainer.head_optimizer.state.items()}}


def _run_then_resume(rank, world_size, root, stage, storage):
    """One uninterrupted run, and the same run cut after step 2 and resumed in fresh trainers; the disk
    storage's directory is deleted before the resume, as a crash that lost the node's scratch disk would."""
    root = Path(root) / storage
    whole = make_trainer(world_size, root / "whole", stage, storage=storage)
    whole_steps = observe.fit(whole)
    files_left = sorted(os.listdir(storage_dir(whole.cfg))) if storage == "disk" else []
    cut = make_trainer(world_size, root / "cut", stage, storage=storage, max_steps=2)
    cut.fit()
    if rank == 0:
        shutil.rmtree(storage_dir(cut.cfg), ignore_errors=True)
    torch.distributed.barrier()
    resumed = make_trainer(world_size, root / "cut", stage, storage=storage)
    resumed.resume()
    resumed_steps = observe.fit(resumed)
    return {"whole": snapshot(whole, whole_steps), "resumed": snapshot(resumed, resumed_steps),
            "files_left": files_left, "store": repr(whole.head.store)}


@pytest.mark.parametrize("world_size,stage", [(2, 0), (3, 2)])
def test_head_storage_device_host_disk_give_the_same_bits_through_save_and_resume(tmp_path, world_size, stage):
    runs = {storage: (_run_then_resume, (str(tmp_path), stage, storage)) for storage in STORAGES}
    results = run_ranks(world_size, in_turn, runs)
    steps = 6 if world_size == 2 else 4
    for rank, result in enumerate(results):
        device = result["device"]["whole"]
        assert len(device["losses"]) == steps and device["step"] == steps
        for storage in STORAGES:
            got = result[storage]
            assert "disk" not in got["store"] or str(tmp_path) in got["store"]
            for run in ("whole", "resumed"):
                # the same losses, centres and momentum as device storage, bit for bit, on every rank
                assert got[run]["head"].dtype == torch.float32
                assert torch.equal(got[run]["head"], device["head"]), (storage, run, rank)
                assert got[run]["optimizer"].keys() == device["optimizer"].keys()
                for key, value in device["optimizer"].items():
                    assert torch.equal(got[run]["optimizer"][key], value), (storage, run, key)
            assert got["whole"]["losses"] == device["losses"], storage
            assert got["resumed"]["losses"] == device["losses"][2:], storage  # steps 3.. after the resume
            assert got["files_left"] == [], "disk storage unlinks its files as soon as they are mapped"
    # the checkpoints (what resume and `export --head` read) are the same bits whatever the storage
    for storage in ("host", "disk"):
        saved = {}
        for which in ("device", storage):
            tag_dir = tmp_path / which / "whole" / "checkpoints"
            tag_dir = tag_dir / latest_tag(tag_dir)
            meta = read_meta(tag_dir)
            saved[which] = head_slices(tag_dir, meta["world_size"], CLASSES, EMBEDDING)
        for mine, theirs in zip(saved["device"], saved[storage]):
            assert torch.equal(mine["sharded"]["head"]["weight"], theirs["sharded"]["head"]["weight"])
            for key, value in mine["sharded"]["head_optimizer"]["state"].items():
                assert torch.equal(value, theirs["sharded"]["head_optimizer"]["state"][key])


def _save(rank, world_size, root, storage, dtype):
    trainer = make_trainer(world_size, Path(root) / f"{storage}-{dtype}", 2, storage=storage, storage_dtype=dtype,
                           max_steps=2)
    trainer.fit()


def _resume_as(rank, world_size, root, name, storage, dtype):
    trainer = make_trainer(world_size, Path(root) / name, 2, storage=storage, storage_dtype=dtype)
    trainer.resume()
    at_resume = snapshot(trainer)
    return {"at_resume": at_resume, "after": snapshot(trainer, observe.fit(trainer))}


# (saved with, resumed as): every storage into another, and 16-bit storage into float32 and back
CHANGES = [("device", "float32", "device", "float32"), ("device", "float32", "disk", "float32"),
           ("disk", "float32", "host", "float32"), ("host", "float32", "device", "float32"),
           ("disk", "bfloat16", "device", "float32"), ("device", "float32", "host", "float16")]


def test_head_storage_may_change_across_a_2_to_3_resize(tmp_path):
    """The checkpoint is float32 slices whatever the storage: a run saved on 2 ranks resumes on 3 under any
    storage, as the same run (bit for bit at float32); 16-bit storage rounds to its dtype on the way in."""
    saves = {f"{s}-{d}": (_save, (str(tmp_path), s, d)) for s, d, _, _ in CHANGES}
    run_ranks(2, in_turn, saves)
    resumes = {}
    for saved_as, dtype, storage, new_dtype in CHANGES:
        name = f"{saved_as}-{dtype}>{storage}-{new_dtype}"  # each resume trains on from its own copy of the save
        shutil.copytree(tmp_path / f"{saved_as}-{dtype}", tmp_path / name)
        resumes[name] = (_resume_as, (str(tmp_path), name, storage, new_dtype))
    results = run_ranks(3, in_turn, resumes)
    reference = "device-float32>device-float32"
    for result in results:
        base = result[reference]
        assert base["at_resume"]["step"] == 2 and len(base["after"]["losses"]) == 2
        for name in ("device-float32>disk-float32", "disk-float32>host-float32", "host-float32>device-float32"):
            for when in ("at_resume", "after"):
                assert torch.equal(result[name][when]["head"], base[when]["head"]), (name, when)
                for key, value in base[when]["optimizer"].items():
                    assert torch.equal(result[name][when]["optimizer"][key], value), (name, when, key)
            assert result[name]["after"]["losses"] == base["after"]["losses"], name
        # bfloat16 storage saved float32 slices holding bfloat16 values; float32 storage takes them as they are
        from_bf16 = result["disk-bfloat16>device-float32"]["at_resume"]["head"]
        assert torch.equal(from_bf16, from_bf16.to(torch.bfloat16).float())
        assert not torch.equal(from_bf16, base["at_resume"]["head"])
        # float32 values stored as float16: rounded to float16 at the resume, and training goes on
        into_fp16 = result["device-float32>host-float16"]
        assert into_fp16["at_resume"]["head"].dtype == torch.float16
        assert torch.equal(into_fp16["at_resume"]["head"], base["at_resume"]["head"].half())
        assert all(map(torch.isfinite, map(torch.tensor, into_fp16["after"]["losses"])))


def test_head_storage_16_bit_stores_half_the_bytes_and_computes_in_float32(tmp_path):
    values = torch.randn(10, 4)
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        for storage in STORAGES:
            store = HeadStore(10, storage, dtype, "cpu", tmp_path / "scratch", rank=0)
            store.add("weight", 4)
            store.write("weight", None, values)
            assert store.whole("weight").dtype == torch_dtype and store.nbytes() == 10 * 4 * 2
            rows = torch.tensor([1, 7])
            got = store.read("weight", rows)
            assert got.dtype == torch.float32 and torch.equal(got, values[rows].to(torch_dtype).float())
            store.write("weight", rows, got + 1)
            assert torch.equal(store.read("weight", rows), (got + 1).to(torch_dtype).float())


def test_head_storage_disk_leaves_no_file_and_takes_no_other_names(tmp_path):
    """The tables' files are unlinked once mapped (a kill -9 leaves nothing to clean), writes reach the
    mapping, and what else is in the directory (a planted link included) is neither read nor touched."""
    directory = tmp_path / "scratch"
    directory.mkdir()
    (directory / "notes.txt").write_text("mine")
    os.symlink(tmp_path / "elsewhere", directory / "ds_face-head-rank0-weight-x.table")
    store = HeadStore(1000, "disk", "float32", "cpu", directory, rank=0)
    store.add("weight", 8)
    store.write("weight", torch.tensor([3, 999]), torch.ones(2, 8))
    assert sorted(os.listdir(directory)) == ["ds_face-head-rank0-weight-x.table", "notes.txt"]
    assert not (tmp_path / "elsewhere").exists() and (directory / "notes.txt").read_text() == "mine"
    assert store.whole("weight").sum().item() == 16


@pytest.fixture
def full_disk(tmp_path):
    yield from mount_tmpfs(tmp_path / f"disk-{uuid.uuid4().hex[:6]}", "1m")


@pytest.fixture
def read_only_disk(tmp_path):
    yield from mount_tmpfs(tmp_path / f"ro-{uuid.uuid4().hex[:6]}", "1m", read_only=True)


def test_head_storage_disk_too_small_is_named_before_the_first_step(full_disk):
    store = HeadStore(100_000, "disk", "float32", "cpu", full_disk / "head", rank=3)
    with pytest.raises(HeadStorageError, match=rf"head.storage_dir: {full_disk / 'head'} has 0\.\d\d GiB free, "
                                               rf"rank 3's 'weight' table needs 0\.19 GiB"):
        store.add("weight", 512)
    assert os.listdir(full_disk / "head") == []  # the half-made file is gone too


def test_head_storage_read_only_disk_is_named(read_only_disk):
    with pytest.raises(HeadStorageError, match=rf"cannot create rank 0's 'weight' table in {read_only_disk}: "
                                               r"Read-only file system"):
        HeadStore(10, "disk", "float32", "cpu", read_only_disk, rank=0).add("weight", 4)


def test_head_storage_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(HeadStorageError, match=rf"cannot create rank 0's 'weight' table in {tmp_path / 'file'}"):
        HeadStore(10, "disk", "float32", "cpu", tmp_path / "file", rank=0).add("weight", 4)


def test_head_storage_settings_are_checked():
    errors = check_run(RunConfig(head=HeadConfig(num_classes=10, storage="gpu", storage_dtype="fp8")))
    assert "'head.storage' must be one of device, host, disk, got 'gpu'" in errors
    assert "'head.storage_dtype' must be one of float32, bfloat16, float16, got 'fp8'" in errors
