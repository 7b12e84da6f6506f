"""Checkpoints: exact resume, re-sharding to another world size, atomic `latest`, bad checkpoints.
Real DeepSpeed engines on real gloo ranks; real files."""
import functools
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ds_face.checkpoint.files import (
    CheckpointError, check_fits, head_file, head_slices, latest_tag, read_meta, run_identity,
)
from ds_face.config import HeadConfig, ModelConfig, RunConfig
from ds_face.runtime.spawn import free_port, run_ranks
from tests import conftest, observe
from tests.conftest import DEEPSPEED, RESUMABLE, ROOT

CLASSES, EMBEDDING, MICRO = 50, 32, 8  # 50 classes: 25/25 on 2 ranks, 17/17/16 on 3
# 48 samples: 3 steps an epoch on 2 ranks; a checkpoint every 2 steps, 2 kept
make_trainer = functools.partial(conftest.make_trainer, **{**RESUMABLE, "samples": 48}, every=2, keep_last=2)


def snapshot(trainer, recorded=()):
    return {"backbone": {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()},
            "head": trainer.head.weight.clone(), "momentum": trainer.head_optimizer.state["momentum_buffer"].clone(),
            "losses": [r.loss for r in recorded], "step": trainer.global_step, "epoch": trainer.epoch}


def _exact_resume(rank, world_size, root, stage):
    whole = make_trainer(world_size, Path(root) / "whole", stage)
    whole_steps = observe.fit(whole)  # 6 steps, 2 epochs
    first = make_trainer(world_size, Path(root) / "cut", stage, max_steps=4)
    first.fit()  # stops mid-epoch 1 after saving step 4
    second = make_trainer(world_size, Path(root) / "cut", stage)
    second.resume()
    resumed_at = (second.global_step, second.epoch)
    second_steps = observe.fit(second)
    return {"whole": snapshot(whole, whole_steps), "second": snapshot(second, second_steps), "resumed_at": resumed_at,
            "tags": sorted(os.listdir(Path(root) / "cut" / "checkpoints"))}


@pytest.mark.parametrize("stage", [0, 2])
def test_resume_continues_the_exact_run(tmp_path, stage):
    results = run_ranks(2, _exact_resume, str(tmp_path), stage)
    for r in results:
        assert r["resumed_at"] == (4, 1)
        assert r["second"]["losses"] == r["whole"]["losses"][4:]  # steps 5 and 6, bit for bit
        assert len(r["whole"]["losses"]) == 6
        assert torch.equal(r["second"]["head"], r["whole"]["head"])
        assert torch.equal(r["second"]["momentum"], r["whole"]["momentum"])
        for key, value in r["whole"]["backbone"].items():
            assert torch.equal(r["second"]["backbone"][key], value), key
    tags = [name for name in results[0]["tags"] if name.startswith("step_")]
    assert tags == ["step_4", "step_6"] and "latest" in results[0]["tags"]  # keep_last 2: step_2 pruned


def _save_on_two(rank, world_size, out_dir, stage):
    trainer = make_trainer(world_size, out_dir, stage, max_steps=3, every=0)
    trainer.fit()  # saves step_3 at the end of epoch 0
    return snapshot(trainer)


def _resume_on(rank, world_size, out_dir, stage):
    trainer = make_trainer(world_size, out_dir, stage)
    trainer.resume()
    state = snapshot(trainer)
    state["range"] = (trainer.head.class_start, trainer.head.num_local)
    trainer.fit()  # and it trains on: epoch 1 with the new layout
    state["trained_to"] = trainer.global_step
    return state


@pytest.mark.parametrize("new_world,stage", [(1, 2), (3, 0)])
def test_head_reshards_exactly_to_another_world_size(tmp_path, new_world, stage):
    saved = run_ranks(2, _save_on_two, str(tmp_path), stage)
    full_head = torch.cat([r["head"] for r in saved])
    full_momentum = torch.cat([r["momentum"] for r in saved])
    resumed = run_ranks(new_world, _resume_on, str(tmp_path), stage)
    ranges = [r["range"] for r in resumed]
    assert sum(n for _, n in ranges) == CLASSES and ranges[0][0] == 0
    assert torch.equal(torch.cat([r["head"] for r in resumed]), full_head)
    assert torch.equal(torch.cat([r["momentum"] for r in resumed]), full_momentum)
    for rank, r in enumerate(resumed):
        assert (r["step"], r["epoch"]) == (3, 1)  # saved after the last step of epoch 0: epoch 1 is next
        for key, value in saved[0]["backbone"].items():
            # BatchNorm statistics are per rank: new rank r takes old rank r mod 2's; weights are rank 0's
            expected = saved[rank % 2]["backbone"][key] if "running" in key or "tracked" in key else value
            assert torch.equal(r["backbone"][key], expected), key
        assert r["trained_to"] > 3


def _failed_save_keeps_previous(rank, world_size, out_dir):
    trainer = make_trainer(world_size, out_dir, max_steps=3, every=0)
    trainer.fit()  # step_3 complete
    if rank == 1:  # rank 1 cannot write its head file: the save fails midway (a full disk, say)
        import errno

        from ds_face.checkpoint import manager as checkpoint

        def full_disk(path, data, durable=True):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        checkpoint.write_atomic = full_disk
    trainer.position.step = 4
    try:
        trainer.checkpoints.save()
        error = None
    except CheckpointError as err:
        error = str(err)
    latest = (Path(out_dir) / "checkpoints" / "latest").read_text()
    fresh = make_trainer(world_size, out_dir)
    fresh.resume()
    return {"error": error, "latest": latest, "resumed_step": fresh.global_step}


def test_failed_save_leaves_the_previous_checkpoint_in_charge(tmp_path):
    results = run_ranks(2, _failed_save_keeps_previous, str(tmp_path))
    for r in results:
        assert r["error"] and "step_4: checkpoint not saved" in r["error"] and "still names the previous" in r["error"]
        assert r["latest"] == "step_3" and r["resumed_step"] == 3
    assert "rank 1:" in results[1]["error"] and "another rank failed" in results[0]["error"]


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    run_ranks(2, _save_on_two, str(out), 2)
    return out / "checkpoints"


def copy_of(saved_checkpoint, tmp_path):
    target = tmp_path / "checkpoints"
    shutil.copytree(saved_checkpoint, target)
    return target, target / "step_3"


def test_head_slices_that_do_not_add_up_fail_loudly(saved_checkpoint, tmp_path):
    save_dir, tag_dir = copy_of(saved_checkpoint, tmp_path)
    files = head_slices(tag_dir, 2, CLASSES, EMBEDDING)
    assert sum(f["sharded"]["head"]["num_local"] for f in files) == CLASSES
    file = torch.load(tag_dir / head_file(1, 2), weights_only=True)
    part = file["sharded"]["head"]
    part["weight"], part["num_local"] = part["weight"][:-2], part["num_local"] - 2
    file["sharded"]["head_optimizer"]["num_local"] -= 2
    torch.save(file, tag_dir / head_file(1, 2))
    with pytest.raises(CheckpointError, match=r"the 2 head slices hold 48 classes, expected 50: they end at class 48 "):
        head_slices(tag_dir, 2, CLASSES, EMBEDDING)
    part["class_start"] = 20
    torch.save(file, tag_dir / head_file(1, 2))
    with pytest.raises(CheckpointError, match=r"head_rank1_of2.pt: head slice starts at class 20, expected 25: an overlap after head_rank0_of2.pt"):
        head_slices(tag_dir, 2, CLASSES, EMBEDDING)


def test_missing_corrupt_and_foreign_checkpoints(saved_checkpoint, tmp_path):
    save_dir, tag_dir = copy_of(saved_checkpoint, tmp_path)
    assert latest_tag(save_dir) == "step_3"
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        latest_tag(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"latest: not found; no complete checkpoint"):
        latest_tag(tmp_path)
    (save_dir / "latest").write_text("step_9")
    with pytest.raises(CheckpointError, match=r"latest names tag 'step_9', but .*step_9 does not exist \(tags in "):
        latest_tag(save_dir)
    (tag_dir / head_file(0, 2)).write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"head_rank0_of2.pt: not a readable torch file"):
        head_slices(tag_dir, 2, CLASSES, EMBEDDING)
    shutil.copy(saved_checkpoint / "step_3" / head_file(0, 2), tag_dir / head_file(0, 2))
    os.remove(tag_dir / head_file(1, 2))
    with pytest.raises(CheckpointError, match=r"head_rank1_of2.pt: not found; the checkpoint is incomplete"):
        head_slices(tag_dir, 2, CLASSES, EMBEDDING)
    meta = read_meta(tag_dir)
    other = RunConfig(model=ModelConfig(backbone="r_tiny", embedding_size=64), head=HeadConfig(num_classes=51))
    with pytest.raises(CheckpointError, match=r"ds_face_meta.json: does not fit this run: num_classes is 50 in the "
                                              r"checkpoint, 51 in the run config; embedding_size is 32"):
        check_fits(meta, run_identity(other), tag_dir / "ds_face_meta.json")
    (tag_dir / "ds_face_meta.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"ds_face_meta.json: corrupt"):
        read_meta(tag_dir)
    os.remove(tag_dir / "ds_face_meta.json")
    with pytest.raises(CheckpointError, match=r"ds_face_meta.json: not found; .* is not a complete ds_face checkpoint"):
        read_meta(tag_dir)


def launch(out, *extra, **popen):
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ds_face.train",
           "--config", "configs/cpu_demo.yaml", "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json",
           "--set", "output.log_every=1", "--set", f"output.dir={out}", "--set", "checkpoint.every_steps=2",
           "--set", "schedule.max_steps=10", "--set", "data.num_samples=3200", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def step_losses(log: str) -> dict[int, str]:
    return {int(line.split("Global Step: ")[1].split("/")[0]): line.split("Loss ")[1].split()[0]
            for line in log.splitlines() if "Global Step: " in line}


def test_kill_9_then_resume_continues_the_same_run(tmp_path):
    """Kill every rank with SIGKILL right after a checkpoint, resume through the real launcher: the steps
    after the resume log the losses of an uninterrupted run."""
    whole = launch(tmp_path / "whole")
    assert whole.wait(300) == 0, whole.stdout.read()[-3000:]
    expected = step_losses((tmp_path / "whole" / "training.log").read_text())
    assert sorted(expected) == list(range(1, 11))

    cut = tmp_path / "cut"
    victim = launch(cut, start_new_session=True)
    deadline = time.time() + 300
    latest = cut / "checkpoints" / "latest"
    while not (latest.is_file() and latest.read_text() in ("step_4", "step_6")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)  # the launcher and both ranks, mid-step
    victim.wait(60)
    killed_at = latest.read_text()

    refused = launch(cut)  # a fresh run must not overwrite the checkpoints
    assert refused.wait(120) == 2
    assert "already holds checkpoints; pass --resume" in refused.stdout.read()

    resumed = launch(cut, "--resume")
    output = resumed.stdout.read()
    assert resumed.wait(300) == 0, output[-3000:]
    assert f"resumed from {cut / 'checkpoints' / killed_at}" in output
    after = {step: loss for step, loss in step_losses(output).items() if step > int(killed_at[5:])}
    assert after and after == {step: expected[step] for step in after}
