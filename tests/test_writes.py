"""Writes never go through a link ds_face did not make, and runs whose steps are all skipped stop.

Planted links at every path ds_face writes aside or into: the writer's temporaries (``latest.partial``-like names,
including the exact fresh name), the targets themselves (config.yaml, manifest.json, shards, embeddings, reports),
DeepSpeed's save_dir and the tag directory, the checkpoints directory. Each link points at a victim file or
directory; the victim must come out untouched, and the write either succeeds without following the link or
stops with one line naming it. Real files, real ranks, real DeepSpeed engines, a real launch.

Skipped steps: a loss scale forged on the real engine's optimizer (NaN, 1e38), a real DeepSpeed dynamic loss
scaler driven to its minimum by gradients made non-finite (fault injection, as tests/test_run_health.py
poisons an output), and a NaN loss scale written into a real checkpoint's ZeRO shard and resumed by a launch.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_face import fileio
from ds_face.checkpoint.files import CheckpointError
from ds_face.runtime.spawn import run_ranks
from tests import conftest

VICTIM = b"the victim's own bytes\n"


def victims(root: Path) -> tuple[Path, Path]:
    """A file and a directory (holding a file) that no write may touch."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "file").write_bytes(VICTIM)
    (root / "dir").mkdir(exist_ok=True)
    (root / "dir" / "inside").write_bytes(VICTIM)
    return root / "file", root / "dir"


def untouched(file: Path, directory: Path) -> bool:
    return (file.read_bytes() == VICTIM and sorted(p.name for p in directory.iterdir()) == ["inside"]
            and (directory / "inside").read_bytes() == VICTIM)


def is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


# -- the writer ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["bytes", "torch.save", "savefig"])
def test_the_writer_never_follows_a_planted_partial_or_a_link_at_the_target(tmp_path, form, caplog):
    file, directory = victims(tmp_path / "victims")
    out = tmp_path / "out"
    out.mkdir()
    target = out / "latest"
    (out / "latest.partial").symlink_to(file)  # the old fixed temporary name
    target.symlink_to(file)  # and the target itself
    if form == "bytes":
        fileio.write_atomic(target, b"step_2")
    elif form == "torch.save":
        fileio.write_atomic(target, lambda f: torch.save({"x": torch.arange(3)}, f))
    else:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig = plt.figure()
        fileio.write_atomic(target, lambda f: fig.savefig(f, format="png"))
        plt.close(fig)
    assert untouched(file, directory)
    assert is_plain_file(target) and (out / "latest.partial").is_symlink()
    written = target.read_bytes()
    if form == "bytes":
        assert written == b"step_2"
    elif form == "torch.save":
        assert torch.load(target, weights_only=True)["x"].tolist() == [0, 1, 2]
    else:
        assert written.startswith(b"\x89PNG")
    assert sorted(p.name for p in out.iterdir()) == ["latest", "latest.partial"]  # no temporary left
    assert f"{target}: was a symbolic link (to {file}); replaced by the file itself" in caplog.text


def test_a_link_planted_at_the_exact_fresh_temporary_name_stops_the_write_naming_it(tmp_path, monkeypatch):
    file, directory = victims(tmp_path / "victims")
    (tmp_path / "config.yaml.0123456789ab.partial").symlink_to(file)
    monkeypatch.setattr(fileio.secrets, "token_hex", lambda n: "0123456789ab")  # the attacker guessed it
    with pytest.raises(fileio.WriteError) as err:
        fileio.write_atomic(tmp_path / "config.yaml", b"model: {}\n")
    assert str(err.value) == (f"{tmp_path / 'config.yaml.0123456789ab.partial'}: something is already at this "
                              f"fresh temporary name (planted?); {tmp_path / 'config.yaml'} not written")
    assert "\n" not in str(err.value) and untouched(file, directory) and not (tmp_path / "config.yaml").exists()


def test_a_failed_write_leaves_no_temporary_and_the_old_file(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        fileio.write_atomic(target, fail)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["manifest.json"]


def test_fresh_dir_removes_a_planted_link_itself_and_real_dir_refuses_one(tmp_path):
    file, directory = victims(tmp_path / "victims")
    (tmp_path / "step_4").symlink_to(directory)
    made = fileio.fresh_dir(tmp_path / "step_4")
    assert made.is_dir() and not made.is_symlink() and not any(made.iterdir()) and untouched(file, directory)
    (tmp_path / ".done").symlink_to(directory)
    with pytest.raises(fileio.WriteError) as err:
        fileio.real_dir(tmp_path / ".done")
    assert str(err.value) == (f"{tmp_path / '.done'}: a symbolic link (to {directory}), where ds_face writes into a "
                              f"directory of its own; remove it")


def test_final_name_of_a_temporary():
    assert fileio.final_name("data-00000-of-00002.arrow.0123456789ab.partial") == "data-00000-of-00002.arrow"
    assert fileio.final_name("manifest.json.partial") is None and fileio.final_name("manifest.json") is None


# -- record_config, manifests, shards, embeddings, reports ---------------------------------------------------

def test_record_config_replaces_planted_links_never_their_targets(tmp_path):
    from ds_face.config import RunConfig
    from ds_face.training.trainer import record_config
    file, directory = victims(tmp_path / "victims")
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.yaml", "config.yaml.partial", "ds_config.json", "ds_config.json.partial"):
        (out / name).symlink_to(file)
    record_config(RunConfig(), {"train_micro_batch_size_per_gpu": 8}, out)
    assert untouched(file, directory)
    assert is_plain_file(out / "config.yaml") and "backbone: r50" in (out / "config.yaml").read_text()
    assert json.loads((out / "ds_config.json").read_text()) == {"train_micro_batch_size_per_gpu": 8}


def test_a_planted_training_log_link_is_refused_and_a_real_log_appended(tmp_path):
    """training.log is appended to across restarts: opened with O_NOFOLLOW, so a link there is named, and the
    file it points to never receives a line."""
    from ds_face.runtime.progress import log, setup_logging
    file, directory = victims(tmp_path / "victims")
    out = tmp_path / "run"
    out.mkdir()
    (out / "training.log").symlink_to(file)
    with pytest.raises(fileio.WriteError, match="training.log: cannot append the log"):
        setup_logging(0, out)
    assert untouched(file, directory)
    (out / "training.log").unlink()
    (out / "training.log").write_text("an earlier start\n")
    setup_logging(0, out)
    log.info("this start")
    for handler in log.handlers:
        handler.flush()
    assert (out / "training.log").read_text().splitlines()[0] == "an earlier start"
    assert (out / "training.log").read_text().rstrip().endswith("this start")
    log.handlers.clear()


def test_shards_sidecars_and_manifest_are_written_past_planted_links(tmp_path):
    import pyarrow as pa

    from data_prep.plan import DONE_DIR
    from data_prep.shard_writer import ShardWriter
    from ds_face.data.shards import Manifest, read_manifest, sha256_of
    from tests.conftest import index_png
    file, directory = victims(tmp_path / "victims")
    out = tmp_path / "arrow"
    (out / DONE_DIR).mkdir(parents=True)
    name = "data-00000-of-00001.arrow"
    for planted in (name, name + ".partial", "manifest.json", "manifest.json.partial",
                    f"{DONE_DIR}/{name}.json", f"{DONE_DIR}/{name}.json.partial"):
        (out / planted).symlink_to(file)
    writer = ShardWriter(out, name, 3, 0, 2)
    writer.append(pa.array([index_png(i) for i in range(3)], pa.binary()), np.array([0, 1, 0]), np.arange(3))
    info = writer.finish()
    Manifest(num_samples=3, num_classes=2, shards=[info]).write(out)
    assert untouched(file, directory)
    assert is_plain_file(out / name) and sha256_of(out / name) == info.sha256
    assert is_plain_file(out / DONE_DIR / f"{name}.json") and read_manifest(out).num_samples == 3

    discarded = ShardWriter(out, "data-00000-of-00002.arrow", 3, 0, 2)
    discarded.discard()  # an interrupted shard: its temporary goes, nothing else
    assert not [p for p in os.listdir(out) if p.endswith(".partial") and not os.path.islink(out / p)]


def test_a_conversion_refuses_a_linked_done_directory_naming_it(tmp_path, capsys):
    """A resumable conversion (its plan.json matches) whose .done/ was replaced by a link: the sidecars would land
    where the link points; the converter stops with one line instead."""
    from data_prep import folder2arrow
    from tests.conftest import index_png
    file, directory = victims(tmp_path / "victims")
    faces = tmp_path / "faces"
    for who in ("alice", "bob"):
        (faces / who).mkdir(parents=True)
        for i in range(3):
            (faces / who / f"{i}.png").write_bytes(index_png(i))
    out = tmp_path / "arrow"
    assert folder2arrow.main([str(faces), str(out), "--shards", "1"]) == 0
    (out / "manifest.json").unlink()  # as if it crashed before the end: a resume
    (out / ".done").symlink_to(directory)
    capsys.readouterr()
    assert folder2arrow.main([str(faces), str(out), "--shards", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{out / '.done'}: a symbolic link (to {directory})" in err and len(err.strip().splitlines()) == 1
    assert untouched(file, directory)


def test_embed_writes_past_planted_links(tmp_path, tiny_model, capsys):
    from ds_face.eval import embed as embed_cli
    from tests.conftest import write_shards
    file, directory = victims(tmp_path / "victims")
    path, _ = tiny_model
    arrow = write_shards(tmp_path / "arrow", 10, 1, num_classes=3)
    out = tmp_path / "emb.npy"
    for planted in ("emb.npy", "emb.labels.npy", f".emb.npy.{os.getpid()}.partial.npy"):
        (tmp_path / planted).symlink_to(file)
    common = ["--model", str(path), "--backbone", "r_tiny", "--embedding", "32", "--device", "cpu",
              "--arrow", str(arrow), "--out", str(out)]
    assert embed_cli.main(common) == 2  # a link is something there: not replaced without --overwrite
    assert "emb.npy exists; pass --overwrite" in capsys.readouterr().err
    assert embed_cli.main(common + ["--overwrite"]) == 0
    assert untouched(file, directory)
    emb, labels = np.load(out), np.load(tmp_path / "emb.labels.npy")
    assert is_plain_file(out) and emb.shape == (10, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert labels.tolist() == [i % 3 for i in range(10)]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial") and not os.path.islink(tmp_path / p)]


def test_a_report_plot_is_written_past_planted_links(tmp_path):
    from ds_face.ijb.scoring import plot_roc
    file, directory = victims(tmp_path / "victims")
    png = tmp_path / "roc.png"
    png.symlink_to(file)
    (tmp_path / "roc.png.partial").symlink_to(file)
    curve = {"fpr": np.array([0.0, 1e-4, 1e-2, 1.0]), "tpr": np.array([0.0, 0.5, 0.9, 1.0])}
    report = {"target": "IJBC", "auc": 0.95, "pairs": 4, "templates": 2,
              "tar_at_far": {"1e-4": {"fpr": 1e-4, "tar": 0.5}}}
    plot_roc(png, curve, report)
    assert untouched(file, directory) and is_plain_file(png) and png.read_bytes().startswith(b"\x89PNG")


def _evaluator_over_a_linked_eval_dir(rank, world_size, root, bin_path, directory):
    from ds_face.training.callbacks import TrainingEvaluator
    trainer = conftest.make_trainer(world_size, root, stage=0, classes=10, samples=64)
    trainer.cfg.eval.sets = [bin_path]
    (Path(root) / "eval").symlink_to(directory)
    try:
        TrainingEvaluator(trainer.cfg.eval, rank, Path(root) / "eval", trainer.engine.module, trainer.engine.device, 0)
    except fileio.WriteError as err:
        return str(err)


def test_a_linked_eval_directory_is_refused_at_the_start(tmp_path):
    from tests.test_eval import write_bin
    file, directory = victims(tmp_path / "victims")
    (tmp_path / "run").mkdir()
    bin_path = write_bin(tmp_path / "lfw.bin", 4)
    [error] = run_ranks(1, _evaluator_over_a_linked_eval_dir, str(tmp_path / "run"), str(bin_path), str(directory))
    assert error == (f"{tmp_path / 'run' / 'eval'}: a symbolic link (to {directory}), where ds_face writes into a "
                     f"directory of its own; remove it")
    assert untouched(file, directory)


# -- checkpoints ----------------------------------------------------------------------------------------------

def _save_past_planted_links(rank, world_size, root, victim_root):
    file, directory = Path(victim_root) / "file", Path(victim_root) / "dir"
    checkpoints = Path(root) / "checkpoints"
    trainer = conftest.make_trainer(world_size, root, stage=2, classes=20, max_steps=2, samples=96)
    result = {}
    if rank == 0:
        checkpoints.symlink_to(directory)  # the whole checkpoints directory a link: refused, named
    torch.distributed.barrier()
    try:
        trainer.checkpoints.save()  # at step 0
    except CheckpointError as err:
        result["linked_dir"] = str(err)
    if rank == 0:
        checkpoints.unlink()
        checkpoints.mkdir()
        for name in ("latest.partial", "zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed copies those
            (checkpoints / name).symlink_to(file)
        (checkpoints / "step_2").symlink_to(directory)  # the tag directory itself
        (checkpoints / ".saving").symlink_to(directory)  # DeepSpeed's save_dir during a save
    torch.distributed.barrier()
    trainer.fit()  # saves step_2 at its end
    try:
        trainer.checkpoints._saved_step = None  # as a new start at step 2 would: it tries to save step 2 again
        trainer.checkpoints.save()  # and `latest` names step_2, so it is never overwritten
    except CheckpointError as err:
        result["again"] = str(err)
    fresh = conftest.make_trainer(world_size, root, stage=2, classes=20, samples=96)
    fresh.resume()
    tag_dir = checkpoints / "step_2"
    result.update(latest=(checkpoints / "latest").read_text(), resumed=fresh.global_step,
                  tag_is_dir=tag_dir.is_dir() and not tag_dir.is_symlink(),
                  files=sorted(p.name for p in tag_dir.iterdir()), listing=sorted(os.listdir(checkpoints)),
                  scripts_linked=all((checkpoints / n).is_symlink() for n in ("zero_to_fp32.py", "zero_to_torch.py")))
    return result


def test_a_checkpoint_save_never_writes_through_planted_links(tmp_path):
    file, directory = victims(tmp_path / "victims")
    (tmp_path / "run").mkdir()
    results = run_ranks(2, _save_past_planted_links, str(tmp_path / "run"), str(tmp_path / "victims"))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert untouched(file, directory)
    assert results[0]["linked_dir"].startswith(
        f"{checkpoints}/step_0: checkpoint not saved ({checkpoints}: a symbolic link (to {directory}); checkpoints "
        f"are written and pruned only in a directory ds_face made")
    assert results[0]["again"] == (f"{checkpoints}/step_2: checkpoint not saved ({checkpoints}/step_2: "
                                   f"{checkpoints}/latest names it, so it is not overwritten); nothing was written")
    other = "checkpoint not saved (rank 0 could not prepare it: its message says why); nothing was written"
    assert results[1]["linked_dir"] == f"{checkpoints}/step_0: {other}"
    assert results[1]["again"] == f"{checkpoints}/step_2: {other}"
    for r in results:
        assert r["latest"] == "step_2" and r["resumed"] == 2 and r["tag_is_dir"] and r["scripts_linked"]
        assert "ds_face_meta.json" in r["files"] and "head_rank1_of2.pt" in r["files"]
        assert ".saving" not in r["listing"] and not [n for n in r["listing"] if n.endswith(".partial")
                                                     and n != "latest.partial"]


# -- skipped steps --------------------------------------------------------------------------------------------

def _forged_scale(rank, world_size, root, how):
    from ds_face.training.trainer import SkippedSteps
    trainer = conftest.make_trainer(world_size, root, stage=2, classes=20, samples=800, max_steps=40)
    optimizer = trainer.engine.optimizer  # DeepSpeed's ZeRO optimizer, fp32: a static loss scale of 1
    if how == "nan" and rank == 0:  # one rank only, as in one forged ZeRO shard
        optimizer.loss_scale = float("nan")
    elif how == "1e38":
        optimizer.loss_scale = 1e38  # finite, but every scaled gradient overflows
        trainer.cfg.schedule.max_skipped_steps = 5
    elif how == "collapse":  # insightface#1715: the scale falls step after step and every step is skipped
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
        optimizer.loss_scaler = DynamicLossScaler(init_scale=2 ** 16, scale_window=100, min_scale=1,
                                                  delayed_shift=2, consecutive_hysteresis=False)

        def poison(module, args, output):  # non-finite gradients, a finite loss
            output.register_hook(lambda grad: grad * float("inf"))
            return output
        trainer.engine.module.register_forward_hook(poison)
    try:
        trainer.fit()
        error = None
    except SkippedSteps as err:
        error = str(err)
    return {"error": error, "step": trainer.global_step, "latest": (Path(root) / "checkpoints" / "latest").exists()}


@pytest.mark.parametrize("how, expected", [
    ("nan", ["the loss scale is nan (expected a finite number > 0: every step with it is skipped), at step 1; "
             "stopping", "on another rank: its loss scale, or the steps it skipped, at step 1; stopping"]),
    ("1e38", ["6 optimizer steps in a row were skipped (more than schedule.max_skipped_steps = 5; loss scale "
              "1e+38, loss "] * 2),
    ("collapse", ["the dynamic (fp16) loss scale is at its minimum (1, fp16.min_loss_scale) and the gradients still "
                  "overflow, after 18 skipped step(s) in a row, at step 18; stopping"] * 2),
])
def test_steps_that_are_all_skipped_stop_the_run_on_every_rank(tmp_path, how, expected):
    results = run_ranks(2, _forged_scale, str(tmp_path), how)
    for r, start in zip(results, expected):
        assert r["error"] and r["error"].startswith(start), r["error"]
        assert "The newest checkpoint" in r["error"] and "\n" not in r["error"]
        assert not r["latest"]  # nothing saved from a run that did not train
    assert len({r["step"] for r in results}) == 1


def test_a_nan_loss_scale_in_a_checkpoint_stops_the_resumed_launch(tmp_path):
    """A real launch saves step_4 (past planted links at config.yaml and friends); a NaN loss scale is written into
    rank 1's ZeRO optimizer shard; the --resume launch stops non-zero, says why, and `latest` still names step_4.
    (The resume's read of the checkpoint refuses the scale before training; had it not, the first step's guard
    would: test_steps_that_are_all_skipped_stop_the_run_on_every_rank[nan].)"""
    file, directory = victims(tmp_path / "victims")
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "config.yaml.partial", "ds_config.json", "checkpoints/latest.partial",
                 "checkpoints/zero_to_fp32.py"):
        (out / name).symlink_to(file)
    args = ["--config", "configs/cpu_demo.yaml", "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json",
            "--set", f"output.dir={out}", "--set", "output.tensorboard=false", "--set", "output.log_every=1",
            "--set", "schedule.max_steps=4"]
    first = conftest.launch(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert untouched(file, directory) and is_plain_file(out / "config.yaml")
    assert (out / "checkpoints" / "latest").read_text() == "step_4"
    shard = out / "checkpoints" / "step_4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    state = torch.load(shard, weights_only=False)  # the test's own file
    state["optimizer_state_dict"]["loss_scaler"].cur_scale = float("nan")
    torch.save(state, shard)
    second = conftest.launch(*args[:-1], "schedule.max_steps=8", "--resume")
    output = second.stdout + second.stderr
    (tmp_path / "resume.log").write_text(output)  # kept for a reader of --basetemp
    assert second.returncode != 0, output[-3000:]
    lines = [line for line in output.splitlines() if "ds_face.train: " in line and "error: " in line]
    assert lines and all("loss scale" in line for line in lines), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step_4"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) == ["step_4"]
    assert untouched(file, directory)
