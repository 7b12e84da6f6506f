"""A start decided without a person: fresh, --resume, or a restart of an elastic launch that resumes by itself
(ds_face.training.recovery), and the time-based checkpoint cadence (checkpoint.every_minutes)."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from ds_face.config import ConfigError
from ds_face.runtime.spawn import free_port, run_ranks
from ds_face.training.recovery import ELASTIC_ENV, RUN_ID_FILE, elastic_run_id, record_run_id, should_resume
from tests import conftest
from tests.conftest import DEEPSPEED, ROOT


def test_a_fresh_run_and_resume_by_hand_are_decided_as_before(tmp_path):
    assert should_resume(False, tmp_path, has_checkpoint=False, run_id=None) is False
    assert should_resume(True, tmp_path, has_checkpoint=True, run_id=None) is True
    assert should_resume(True, tmp_path, has_checkpoint=False, run_id=None) is True  # the reader names what is missing
    with pytest.raises(ConfigError, match=r"checkpoints already holds checkpoints; pass --resume to continue that run"):
        should_resume(False, tmp_path, has_checkpoint=True, run_id=None)


def test_an_elastic_restart_resumes_only_its_own_checkpoints(tmp_path):
    assert should_resume(False, tmp_path, has_checkpoint=False, run_id="run-a") is False  # its first start
    record_run_id(tmp_path, "run-a")
    assert should_resume(False, tmp_path, has_checkpoint=True, run_id="run-a") is True  # a restart: no flag
    with pytest.raises(ConfigError, match=r"already holds checkpoints \(elastic run run-a, not this launch's run-b\); "
                                          r"pass --resume"):
        should_resume(False, tmp_path, has_checkpoint=True, run_id="run-b")
    assert should_resume(True, tmp_path, has_checkpoint=True, run_id="run-b") is True  # adopted by hand
    (tmp_path / RUN_ID_FILE).unlink()
    with pytest.raises(ConfigError, match=r"\(not started by this elastic launch\)"):
        should_resume(False, tmp_path, has_checkpoint=True, run_id="run-a")


@pytest.mark.parametrize("plant", ["link", "fifo", "directory", "garbage"])
def test_a_planted_run_id_file_is_never_followed_nor_trusted(tmp_path, plant):
    target = tmp_path / "elsewhere"
    target.write_text("run-a\n")
    path = tmp_path / RUN_ID_FILE
    if plant == "link":
        path.symlink_to(target)  # names the right id, through a link: refused, not followed
    elif plant == "fifo":
        os.mkfifo(path)  # would block a reader that waits on it
    elif plant == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"run-a\n$(touch /tmp/x)\xff" * 100)
    if plant == "garbage":  # read, and not an id: the checkpoints are not this launch's
        with pytest.raises(ConfigError, match=r"\(not started by this elastic launch\)"):
            should_resume(False, tmp_path, has_checkpoint=True, run_id="run-a")
    else:
        with pytest.raises(ConfigError, match=rf"{path}: not a regular file ds_face wrote"):
            should_resume(False, tmp_path, has_checkpoint=True, run_id="run-a")


@pytest.mark.parametrize("value", ["", "a b", "x" * 65, "$(id)", "../x", "run\n", "-rf", ".hidden", "é"])
def test_a_malformed_run_id_is_refused(monkeypatch, value):
    monkeypatch.setenv(ELASTIC_ENV, value)
    with pytest.raises(ConfigError, match=rf"{ELASTIC_ENV}=.*: expected 1-64 characters"):
        elastic_run_id()


def _launch(out, run_id, *extra):
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ds_face.train",
           "--config", "configs/cpu_demo.yaml", "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json",
           "--set", "output.log_every=1", "--set", f"output.dir={out}", "--set", "data.num_samples=3200", *extra]
    env = {**os.environ, ELASTIC_ENV: run_id}
    return subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)


def test_an_elastic_restart_resumes_by_itself_through_the_real_launcher(tmp_path):
    """What the elastic agent does after a failure, by hand: the same launch started again. It resumes `latest`
    with no flag and says so; another launch on the same output.dir is refused."""
    out = tmp_path / "run"
    first = _launch(out, "run-a", "--set", "schedule.max_steps=2")
    assert first.returncode == 0, first.stdout[-3000:]
    assert (out / RUN_ID_FILE).read_text() == "run-a\n"
    assert json.loads((out / "last_step.json").read_text())["step"] == 2

    again = _launch(out, "run-a", "--set", "schedule.max_steps=4")
    assert again.returncode == 0, again.stdout[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_2'}" in again.stdout
    assert ("recovery: world size 2 -> 2 (micro-batch 32 x accumulation 1); resumed step_2 (step 2, 128 samples, "
            "saved on 2 rank(s)); redoing 0 step(s), 0 samples, trained after it") in again.stdout
    assert "recovery: first step after it, " in again.stdout
    assert json.loads((out / "last_step.json").read_text())["step"] == 4

    other = _launch(out, "run-b")
    assert other.returncode == 2
    assert f"{out / 'checkpoints'} already holds checkpoints (elastic run run-a, not this launch's run-b)" in other.stdout


def _cadence(rank, world_size, root):
    trainer = conftest.make_trainer(world_size, root, classes=10, samples=160, every=0, keep_last=0, max_steps=4)
    trainer.checkpoints.policy.every_minutes = 1e-9  # always due: a save after every step
    trainer.fit()
    return sorted(p.name for p in (Path(root) / "checkpoints").iterdir() if p.name.startswith("step_"))


def test_every_minutes_saves_when_the_time_has_passed_on_any_rank(tmp_path):
    results = run_ranks(2, _cadence, tmp_path)
    # 10 steps an epoch, so no epoch end among the 4: each save is the cadence's (the last also the run end's)
    assert results[0] == results[1] == [f"step_{n}" for n in range(1, 5)]
