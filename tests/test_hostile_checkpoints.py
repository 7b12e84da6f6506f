"""Hostile checkpoints: real DeepSpeed checkpoints saved by a short real run, then tampered with, and resumed by
real ranks. Nothing in them runs (one reader sees every file of the tag, at any depth), `latest` is read as a
bounded tag name, and what is read back is range-checked before anything is restored or allocated from it.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ds_face.checkpoint.files import (
    CheckpointError, check_deepspeed_files, check_position, check_resume, engine_kind, head_slices, latest_tag, run_identity,
    read_meta,
)
from ds_face.checkpoint.safe_load import UnsafeFileError, check_checkpoint_dir, load_weights_only
from ds_face.runtime.spawn import run_ranks
from tests import conftest
from tests.test_safe_load import write_malicious

ROOT = Path(__file__).resolve().parents[1]
TAG = "step_2"
CLASSES, EMBEDDING = 5, 16
make_trainer = functools.partial(conftest.make_trainer, classes=CLASSES, embedding=EMBEDDING, micro=2, clip=1.0,
                                 samples=100)
CASES = {"z2_fp32": (2, "fp32"), "z1_fp16": (1, "fp16")}


def _save_worker(rank, world_size, root):
    from deepspeed.accelerator import get_accelerator
    get_accelerator().is_fp16_supported = lambda: True  # torch runs fp16 on any CPU; DeepSpeed's probe says no
    for name, (stage, precision) in CASES.items():
        trainer = make_trainer(world_size, Path(root) / name, stage, precision, max_steps=2)
        trainer.fit()  # two steps, then the trainer's own save: step_2
        torch.distributed.barrier()
        del trainer
    return 0


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{case: save_dir} of real checkpoints saved on 2 ranks (shared by the tests: copy before changing)."""
    root = tmp_path_factory.mktemp("hostile")
    run_ranks(2, _save_worker, str(root))
    return {name: root / name / "checkpoints" for name in CASES}


def copy_run(saved, tmp_path, case="z2_fp32") -> Path:
    """A copy of a saved run's output.dir; returns its checkpoints directory."""
    return Path(shutil.copytree(saved[case], tmp_path / "run" / "checkpoints"))


def _resume(rank, world_size, out_dir, stage, precision, optimizer, extra_ds):
    """A real resume on this rank: (the CheckpointError's text or None, how much the peak RSS grew in MiB)."""
    import resource
    from deepspeed.accelerator import get_accelerator
    get_accelerator().is_fp16_supported = lambda: True
    trainer = make_trainer(world_size, out_dir, stage, precision, optimizer=optimizer, extra_ds=extra_ds)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        trainer.resume()
        error = None
    except CheckpointError as err:
        error = str(err)
    return error, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def resume(world_size, save_dir: Path, stage=2, precision="fp32", optimizer="sgd", extra_ds=None):
    return run_ranks(world_size, _resume, str(save_dir.parent), stage, precision, optimizer, extra_ds)


def rewrite(path: Path, change) -> None:
    """Read a torch file weights-only, ``change(obj)`` it, save it back."""
    obj = load_weights_only(path)
    change(obj)
    torch.save(obj, path)


# -- one reader for every file: sub-folders, any name, links, fifos --------------------------------------------

@pytest.mark.parametrize("where", ["zero/optimizer_state.pt", "zero/fc.weight/exp_avg.pt", "zero/notes.txt",
                                   "a/b/c/d/model.bin", ".hidden.pt"])
def test_a_payload_anywhere_under_the_tag_is_refused_and_never_runs(saved, tmp_path, where):
    tag_dir = copy_run(saved, tmp_path) / TAG
    target = tag_dir / where
    target.parent.mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "pwned"
    refused = write_malicious(target, "os.system", marker)
    if where.endswith("exp_avg.pt"):  # control, once: unpickled as DeepSpeed does (weights_only=False), it runs
        subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(target)!r}, weights_only=False)"],
                       check=True, capture_output=True)
        assert marker.exists()
        marker.unlink()
    with pytest.raises(UnsafeFileError) as err:
        check_checkpoint_dir(tag_dir)
    assert str(err.value).startswith(f"{target}: refused to load: it names the global {refused}")
    assert not marker.exists()


def test_a_resume_with_load_universal_refuses_the_payload_in_zero(saved, tmp_path):
    """The DeepSpeed JSON check refuses "checkpoint" (tests/test_hostile_configs.py); here the engine is built with
    it anyway, as a program using the Trainer could, and the reader still stops the file before DeepSpeed."""
    save_dir = copy_run(saved, tmp_path)
    target = save_dir / TAG / "zero" / "optimizer_state.pt"
    target.parent.mkdir()
    marker = tmp_path / "pwned"
    write_malicious(target, "os.system", marker)
    results = resume(2, save_dir, extra_ds={"checkpoint": {"load_universal": True}})
    for error, _ in results:
        assert error and error.startswith(f"{target}: refused to load: it names the global posix.system"), error
    assert not marker.exists()


def test_links_fifos_and_odd_files_inside_the_tag_are_refused_by_name(saved, tmp_path):
    tag_dir = copy_run(saved, tmp_path) / TAG
    elsewhere = tmp_path / "elsewhere.pt"
    torch.save({"w": torch.ones(2)}, elsewhere)
    link = tag_dir / "zero" / "fp32.pt"
    link.parent.mkdir()
    link.symlink_to(elsewhere)
    with pytest.raises(UnsafeFileError, match=rf"{link}: a symbolic link \(to '{elsewhere}'\) inside a checkpoint"):
        check_checkpoint_dir(tag_dir)
    link.unlink()
    (tag_dir / "zero" / "linked_dir").symlink_to(tmp_path)
    with pytest.raises(UnsafeFileError, match="linked_dir: a symbolic link"):
        check_checkpoint_dir(tag_dir)
    (tag_dir / "zero" / "linked_dir").unlink()
    os.mkfifo(tag_dir / "zero" / "pipe.pt")
    with pytest.raises(UnsafeFileError, match=r"pipe\.pt: not a regular file \(a device, fifo or socket\)"):
        check_checkpoint_dir(tag_dir)
    (tag_dir / "zero" / "pipe.pt").unlink()
    (tag_dir / "README.txt").write_text("notes")  # default deny: not a known plain file, so it must be a torch file
    with pytest.raises(UnsafeFileError, match=r"README\.txt: not a readable torch file"):
        check_checkpoint_dir(tag_dir)
    (tag_dir / "README.txt").unlink()
    deep = tag_dir.joinpath(*"abcdefghij")
    deep.mkdir(parents=True)
    with pytest.raises(UnsafeFileError, match="folders nested deeper than 8 levels"):
        check_checkpoint_dir(tag_dir)


# -- `latest`: a plain, bounded tag name ---------------------------------------------------------------------------

def test_latest_is_read_as_a_bounded_tag_name(saved, tmp_path):
    save_dir = copy_run(saved, tmp_path)
    latest = save_dir / "latest"
    latest.write_bytes(b"step_2\n")
    assert latest_tag(save_dir) == TAG
    for content, expect in ((b"x" * (10 << 20), "longer than 256 bytes; it should hold one tag name"),
                            (b"../step_2", r"names '\.\./step_2', which is not a tag name a save writes"),
                            (b"step_2/zero", "which is not a tag name"), (b"\xff\xfe\x00", "which is not a tag name"),
                            (b"step_02", "which is not a tag name"), (b"  \n", "is empty")):
        latest.write_bytes(content)
        with pytest.raises(CheckpointError, match=expect) as err:
            latest_tag(save_dir)
        assert "\n" not in str(err.value)
    latest.unlink()
    latest.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="latest: a symbolic link; a save writes `latest` as a plain file"):
        latest_tag(save_dir)
    latest.unlink()
    os.mkfifo(latest)
    done = []
    worker = threading.Thread(target=lambda: done.append(_error(latest_tag, save_dir)), daemon=True)
    worker.start()
    worker.join(10)
    assert done and "latest: not a regular file" in done[0]
    latest.unlink()
    latest.write_text("step_7")
    (save_dir / "step_7").symlink_to(save_dir / TAG)
    with pytest.raises(CheckpointError, match=r"step_7: a symbolic link; `latest` must name a checkpoint directory"):
        latest_tag(save_dir)


def _error(function, *args) -> str:
    try:
        function(*args)
    except CheckpointError as err:
        return str(err)
    return "accepted"


def resume_cli(capsys, save_dir: Path, *extra) -> str:
    """``ds_face.train --resume`` on the saved run (its config), up to its first error: that one line."""
    from ds_face.train import main
    ds = save_dir.parent / "ds.json"
    if not ds.exists():
        ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                                  "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}))
    args = ["--config", str(ROOT / "configs" / "cpu_demo.yaml"), "--deepspeed_config", str(ds), "--resume",
            "--set", f"output.dir={save_dir.parent}", "--set", f"model.embedding_size={EMBEDDING}",
            "--set", f"head.num_classes={CLASSES}", "--set", "data.num_samples=100", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_10_mb_latest_stops_the_resume_in_one_line(saved, tmp_path, capsys):
    save_dir = copy_run(saved, tmp_path)
    (save_dir / "latest").write_bytes(b"step_2" * (10 << 20 // 6))
    line = resume_cli(capsys, save_dir)
    assert line == (f"ds_face.train: error: {save_dir / 'latest'}: longer than 256 bytes; it should hold one tag "
                    f"name such as step_300 (a save writes it): corrupt or not ds_face's")


# -- resume with another ZeRO stage, precision or optimizer: one line naming both -------------------------------

def test_another_stage_precision_or_optimizer_is_one_line_naming_both(saved, tmp_path, capsys):
    save_dir = copy_run(saved, tmp_path)
    ds = save_dir.parent / "ds.json"
    base = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
            "zero_allow_untested_optimizer": True}
    ds.write_text(json.dumps(base))
    assert resume_cli(capsys, save_dir) == (
        f"ds_face.train: error: {save_dir / TAG}: saved by another kind of run: ZeRO stage 2 in the checkpoint, 3 in "
        f"this run; resume with the ZeRO stage, precision and optimizer it was saved with (world size and batch "
        f"may change)")
    ds.write_text(json.dumps({**base, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    assert "precision fp32 in the checkpoint, bf16 in this run" in resume_cli(capsys, save_dir)
    ds.write_text(json.dumps({**base, "zero_optimization": {"stage": 2}}))
    assert "optimizer 'sgd' in the checkpoint, adamw in this run" in resume_cli(capsys, save_dir,
                                                                             "--set", "optimizer.name=adamw")


def test_a_real_resume_at_another_stage_is_refused_on_every_rank(saved, tmp_path):
    save_dir = copy_run(saved, tmp_path)
    for error, _ in resume(2, save_dir, stage=3):
        assert error == (f"{save_dir / TAG}: saved by another kind of run: ZeRO stage 2 in the checkpoint, 3 in this "
                         f"run; resume with the ZeRO stage, precision and optimizer it was saved with (world size and "
                         f"batch may change)"), error


# -- loss scales and counters read back --------------------------------------------------------------------------

SHARD = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def test_a_nan_loss_scale_in_an_fp32_shard_stops_the_resume(saved, tmp_path):
    save_dir = copy_run(saved, tmp_path)
    target = save_dir / TAG / SHARD
    rewrite(target, lambda o: setattr(o["optimizer_state_dict"]["loss_scaler"], "cur_scale", math.nan))
    for error, _ in resume(2, save_dir):
        assert error == (f"{target}: 'optimizer_state_dict.loss_scaler.cur_scale' is nan; this run is fp32, whose "
                         f"loss scale is exactly 1 (a NaN or huge scale makes every step overflow and be skipped)")


@pytest.mark.parametrize("case,file,change,expect", [
    ("z2_fp32", SHARD, lambda o: setattr(o["optimizer_state_dict"]["loss_scaler"], "cur_scale", 1e38),
     "'optimizer_state_dict.loss_scaler.cur_scale' is 1e+38; this run is fp32, whose loss scale is exactly 1"),
    ("z2_fp32", SHARD, lambda o: setattr(o["optimizer_state_dict"]["loss_scaler"], "dynamic", True),
     "'optimizer_state_dict.loss_scaler.dynamic' is True; this run's loss scale is absent"),
    ("z2_fp32", "backbone_full.pt", lambda o: o["loss_scaler"].update(cur_scale=math.inf),
     "'loss_scaler.cur_scale' is inf; this run is fp32"),
    ("z2_fp32", "mp_rank_00_model_states.pt", lambda o: o.update(global_steps=10**12),
     "'global_steps' is 1000000000000; expected a whole number in [0, 2] (the checkpoint is at step 2)"),
    ("z2_fp32", "mp_rank_00_model_states.pt", lambda o: o.update(skipped_steps=-3),
     "'skipped_steps' is -3; expected a whole number in [0, 2]"),
    ("z2_fp32", "head_rank1_of2.pt", lambda o: o["sharded"]["head_optimizer"].update(steps_applied=7),
     "'sharded.head_optimizer.steps_applied' is 7; expected a whole number in [0, 2]"),
    ("z1_fp16", SHARD, lambda o: setattr(o["optimizer_state_dict"]["loss_scaler"], "cur_scale", 3.0),
     "'optimizer_state_dict.loss_scaler.cur_scale' is 3.0; a dynamic fp16 loss scale is a power of two"),
    ("z1_fp16", SHARD, lambda o: setattr(o["optimizer_state_dict"]["loss_scaler"], "cur_scale", math.nan),
     "'optimizer_state_dict.loss_scaler.cur_scale' is nan; an fp16 loss scale is a finite number in (0, 2**64]"),
    ("z1_fp16", SHARD, lambda o: setattr(o["optimizer_state_dict"]["loss_scaler"], "scale_factor", 1e38),
     "'optimizer_state_dict.loss_scaler.scale_factor' is 1e+38; expected a number in (1, 1024]"),
    ("z1_fp16", "backbone_full.pt", lambda o: o["loss_scaler"].update(cur_scale=0.0),
     "'loss_scaler.cur_scale' is 0.0; an fp16 loss scale is a finite number in (0, 2**64]"),
])
def test_values_read_back_are_range_checked(saved, tmp_path, case, file, change, expect):
    save_dir = copy_run(saved, tmp_path, case)
    tag_dir = save_dir / TAG
    run = engine_kind({"zero_optimization": {"stage": CASES[case][0]},
                       **({"fp16": {"enabled": True}} if CASES[case][1] == "fp16" else {})})
    check_deepspeed_files(tag_dir, run, 2)  # the real files pass
    rewrite(tag_dir / file, change)
    with pytest.raises(CheckpointError) as err:
        check_deepspeed_files(tag_dir, run, 2)
    assert str(err.value).startswith(f"{tag_dir / file}: {expect}"), str(err.value)


def test_meta_values_and_the_position_are_range_checked(saved, tmp_path):
    tag_dir = copy_run(saved, tmp_path) / TAG
    meta_path = tag_dir / "ds_face_meta.json"
    meta = json.loads(meta_path.read_text())
    for change, expect in (({"samples_seen": 1}, "'global_step' 2 and 'epoch' 0 cannot exceed 'samples_seen' 1"),
                           ({"global_step": 2**60}, "'global_step' is 1152921504606846976, more than 9007199254740992"),
                           ({"global_batch": 5}, "'global_batch' is 5, but world_size x micro_batch x accumulation"),
                           ({"config": {**meta["config"], "seed": -5}}, "'seed' must be an integer >= 0, got -5")):
        meta_path.write_text(json.dumps({**meta, **change}))
        with pytest.raises(CheckpointError, match=expect):
            read_meta(tag_dir)
    meta_path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"ds_face_meta\.json: corrupt \(nested deeper than 32 levels"):
        read_meta(tag_dir)
    meta_path.write_text(json.dumps(meta))
    slices = head_slices(tag_dir, 2, CLASSES, EMBEDDING)
    check_position(slices[0], meta, tag_dir)
    slices[0]["replicated"]["position"]["samples"] = 10**9
    with pytest.raises(CheckpointError, match=r"head_rank0_of2\.pt: the run's position is .*, but ds_face_meta\.json "
                                              r"says \{'step': 2, 'samples': 8\}"):
        check_position(slices[0], meta, tag_dir)


# -- tensors checked against the run before anything is allocated from them --------------------------------------

def test_a_20001_key_backbone_full_is_refused_with_bounded_memory(saved, tmp_path):
    save_dir = copy_run(saved, tmp_path)
    target = save_dir / TAG / "backbone_full.pt"

    def forge(state):  # small plain tensors (an expanded view is refused by the loader itself, tests/test_safe_load)
        state["params"] = {f"layer9.{i}.weight": {"fp32": torch.zeros(1), "momentum_buffer": torch.zeros(1)}
                           for i in range(20_001)}
    rewrite(target, forge)
    assert target.stat().st_size < 20 << 20
    results = resume(1, save_dir)  # saved on 2 ranks: a resize, which reads backbone_full.pt
    error, grown = results[0]
    assert error.startswith(f"{target}: holds state for 20001 parameters, this backbone trains "), error
    print(f"20,001-key backbone_full.pt: peak RSS grew {grown:.0f} MiB during the refused resume")
    assert grown < 200


def _backbone_engine():
    from ds_face.backbones import get_backbone

    class Engine:  # what check_full_state reads of an engine: its module's trainable parameters
        module = get_backbone("r_tiny", EMBEDDING)
    return Engine()


@pytest.mark.parametrize("change,expect", [
    (lambda p: p["fc.bias"].update(fp32=torch.zeros(1).expand(EMBEDDING)),
     r"params\.fc\.bias\.fp32'? is an expanded or overlapping view"),
    (lambda p: p["fc.bias"].update(momentum_buffer=p["fc.bias"]["fp32"]), "shares its storage with another tensor"),
    (lambda p: p["fc.bias"].update(fp32=p["fc.bias"]["fp32"].half()), r"must be a float32 tensor of shape \[16\], got "
                                                                      r"torch\.float16"),
    (lambda p: p["fc.bias"].update(fp32=torch.full((EMBEDDING,), math.nan)), r"'params\.fc\.bias\.fp32' holds NaN"),
    (lambda p: p["fc.bias"].update(fp32=torch.zeros(EMBEDDING + 1)), r"shape \[16\], got torch\.float32 \[17\]"),
    (lambda p: p["fc.bias"].update(extra=torch.zeros(EMBEDDING)), r"must hold exactly \['fp32', 'momentum_buffer'\]"),
    (lambda p: p.pop("fc.bias"), r"missing: fc\.bias"),
])
def test_backbone_full_tensors_are_checked_against_the_model(saved, tmp_path, change, expect):
    from ds_face.checkpoint.zero_state import check_full_state
    path = copy_run(saved, tmp_path) / TAG / "backbone_full.pt"
    engine = _backbone_engine()
    check_full_state(load_weights_only(path, mmap=True), engine, "sgd")
    rewrite(path, lambda state: change(state["params"]))
    with pytest.raises(ValueError, match=expect):
        check_full_state(load_weights_only(path, mmap=True), engine, "sgd")
    with pytest.raises(ValueError, match=r"'state_keys' is \['momentum_buffer'\]; the adamw optimizer keeps"):
        check_full_state(load_weights_only(saved["z2_fp32"] / TAG / "backbone_full.pt", mmap=True), engine, "adamw")


def _head(change):
    """``change`` applied to the head's part of a rank's file."""
    return lambda file: change(file["sharded"]["head"])


@pytest.mark.parametrize("change,expect", [
    (_head(lambda o: o.update(weight=o["weight"].half())), "'weight' is torch.float16, expected float32"),
    (_head(lambda o: o.update(weight=o["weight"].to(torch.int8))), "'weight' is torch.int8, expected float32"),
    (_head(lambda o: o["weight"].__setitem__((0, 0), math.nan)), "'sharded.head.weight' holds NaN or inf"),
    (_head(lambda o: o.update(weight=torch.zeros(1).expand(3, EMBEDDING))), "weight'? is an expanded or overlapping"),
    (_head(lambda o: o.update(momentum=o["weight"])), "shares its storage with another tensor"),
    (lambda o: o.update(rank="0"), "not a head slice"),
    (lambda o: o["sharded"].pop("head_optimizer"), r"holds the sharded parts \['head'\], expected"),
    (lambda o: o["sharded"]["head_optimizer"].update(num_local=1), r"part 'head_optimizer' holds classes 0\+1"),
    (lambda o: o.pop("sharded"), "not a ds_face checkpoint file"),
])
def test_head_file_tensors_are_checked(saved, tmp_path, change, expect):
    tag_dir = copy_run(saved, tmp_path) / TAG
    rewrite(tag_dir / "head_rank0_of2.pt", change)
    with pytest.raises(CheckpointError, match=expect) as err:
        head_slices(tag_dir, 2, CLASSES, EMBEDDING, ["head", "head_optimizer"])  # the parts a resume expects
    assert str(err.value).startswith(str(tag_dir / "head_rank0_of2.pt"))


def test_check_resume_accepts_the_real_checkpoint(saved):
    from ds_face.config import HeadConfig, ModelConfig, RunConfig
    cfg = RunConfig(model=ModelConfig(backbone="r_tiny", embedding_size=EMBEDDING),
                    head=HeadConfig(num_classes=CLASSES))
    meta = check_resume(saved["z2_fp32"], run_identity(cfg), engine_kind({"zero_optimization": {"stage": 2}}))
    assert meta["global_step"] == 2
