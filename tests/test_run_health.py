"""States nobody checked: a run whose loss goes NaN stops and never moves `latest` to a non-finite checkpoint;
a save onto a full disk says so, names the file, and keeps the previous checkpoint in charge.

Real ranks, real DeepSpeed engines, real files. The NaN comes from a forward hook (fault injection, as tests/test_engine.py
poisons a gradient): it poisons the backbone's output from a given step on (DeepSpeed then skips the NaN
gradients, and so does the head: the weights stay finite) or, once, one weight of rank 0's head; the full disk is a
real 6 MB tmpfs (skipped where this user cannot mount one).
"""
import functools
import uuid
from pathlib import Path

import pytest
import torch

from ds_face.checkpoint.files import CheckpointError
from ds_face.runtime.spawn import run_ranks
from tests import conftest
from tests.conftest import RESUMABLE, mount_tmpfs

make_trainer = functools.partial(conftest.make_trainer, **RESUMABLE)


def _nan_from_step(rank, world_size, root, first_bad_step, max_nonfinite, what):
    from ds_face.training.trainer import NonFiniteLoss
    trainer = make_trainer(world_size, root, stage=2, every=4, samples=96)  # 6 steps an epoch; saves at 4, 6
    trainer.cfg.schedule.max_nonfinite_steps = max_nonfinite

    def poison(module, args, output):  # in step k's forward, position.step is k - 1
        if trainer.position.step + 1 < first_bad_step:
            return output
        if what == "head":
            if rank == 0 and trainer.position.step + 1 == first_bad_step:
                trainer.head.weight[0, 0] = float("nan")
            return output
        return output * float("nan")
    trainer.engine.module.register_forward_hook(poison)
    try:
        trainer.fit()
        error = None
    except (NonFiniteLoss, CheckpointError) as err:
        error = f"{type(err).__name__}: {err}"
    latest = (Path(root) / "checkpoints" / "latest").read_text()
    fresh = make_trainer(world_size, root, stage=2)
    fresh.resume()
    finite = bool(torch.isfinite(fresh.head.weight).all()) and all(
        bool(torch.isfinite(p).all()) for p in fresh.engine.module.parameters())
    return {"error": error, "latest": latest, "steps": trainer.global_step, "resumed_finite": finite,
            "dirs": sorted(p.name for p in (Path(root) / "checkpoints").iterdir())}


def test_a_nan_loss_stops_the_run_after_max_nonfinite_steps(tmp_path):
    results = run_ranks(2, _nan_from_step, str(tmp_path), 5, 1, "output")  # NaN from step 5, stop at the first
    for r in results:
        assert r["error"].startswith("NonFiniteLoss: the loss was nan for 1 optimizer step(s) in a row, up to "
                                     "step 5; stopping")
        assert r["latest"] == "step_4" and r["steps"] == 5 and r["resumed_finite"]


def test_a_non_finite_checkpoint_is_never_saved(tmp_path):
    results = run_ranks(2, _nan_from_step, str(tmp_path), 5, 3, "head")  # NaN weight at step 5: no save at 6
    for r in results:
        assert r["error"].startswith("CheckpointError: ") and "step_6: not saved: non-finite (NaN/inf) weights" \
            in r["error"] and "still names the previous checkpoint" in r["error"]
        assert r["latest"] == "step_4" and r["resumed_finite"]
        assert "step_6" not in r["dirs"]


def _zero3_nan_in(rank, world_size, root, where):
    """ZeRO 3 on 3 ranks: the last rank's partitions are padded (DeepSpeed leaves the padding unwritten, so it
    may hold NaN bits). NaN in that padding is no weight and must not stop a save; NaN in a weight must."""
    from ds_face.checkpoint.zero_state import owned_values
    trainer = make_trainer(world_size, root, stage=3, max_steps=2)
    padded = [p for p in trainer.engine.module.parameters() if owned_values(p).numel() < p.ds_tensor.numel()]
    if rank == world_size - 1:
        with torch.no_grad():
            for p in padded:
                if where == "padding":
                    p.ds_tensor.view(-1)[owned_values(p).numel():] = float("nan")
                else:
                    owned_values(p)[0] = float("nan")
    try:
        trainer.checkpoints.save()  # at step 0
        error = None
    except CheckpointError as err:
        error = str(err)
    return {"padded": len(padded), "error": error, "latest": (Path(root) / "checkpoints" / "latest").is_file()}


@pytest.mark.parametrize("where", ["padding", "weight"])
def test_zero3_padding_is_not_a_weight_to_check(tmp_path, where):
    results = run_ranks(3, _zero3_nan_in, str(tmp_path), where)
    assert results[-1]["padded"] > 0  # r_tiny has parameters 3 does not divide
    for r in results:
        if where == "padding":
            assert r["error"] is None and r["latest"]
        else:
            assert "step_0: not saved: non-finite (NaN/inf) weights" in r["error"] and not r["latest"]


@pytest.fixture
def small_disk(tmp_path):
    yield from mount_tmpfs(tmp_path / f"disk-{uuid.uuid4().hex[:6]}", "6m")


def _fill_the_disk(rank, world_size, root):
    trainer = make_trainer(world_size, root, stage=2, every=2, samples=96)  # a checkpoint is ~3.7 MB
    try:
        trainer.fit()
        error = None
    except CheckpointError as err:
        error = str(err)
    saved_step = trainer.global_step
    fresh = make_trainer(world_size, root, stage=2)
    fresh.resume()
    return {"error": error, "latest": (Path(root) / "checkpoints" / "latest").read_text(), "at": saved_step,
            "resumed_step": fresh.global_step, "dirs": sorted(p.name for p in (Path(root) / "checkpoints").iterdir())}


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(small_disk):
    results = run_ranks(2, _fill_the_disk, str(small_disk))
    errors = [r["error"] for r in results]
    assert all(e and "step_4: checkpoint not saved" in e for e in errors), errors
    assert any("no space left on device" in e for e in errors), errors
    assert any(".pt" in e.split("not saved", 1)[1] or "DeepSpeed's files" in e for e in errors), errors
    for r in results:
        assert r["latest"] == "step_2" and r["resumed_step"] == 2 and r["at"] == 4
        assert "step_4" not in r["dirs"]  # the failed save's files are removed: the space is free again
