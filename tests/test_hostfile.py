"""The hostfile check launch.sh runs before any rank starts (python -m ds_face.hostfile, launch.sh --hostfile)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_face.hostfile import HostfileError, main, parse_hostfile

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "hostfile"
    path.write_text(text)
    return path


def test_good_hostfile_with_comments_and_blank_lines(tmp_path, capsys):
    path = write(tmp_path, "# nodes\n\nlocalhost slots=8   # first\n127.0.0.2\tslots=4\n")
    assert parse_hostfile(str(path)) == {"localhost": 8, "127.0.0.2": 4}
    assert main([str(path)]) == 0
    assert "2 hosts, 12 slots" in capsys.readouterr().out


def test_the_example_is_well_formed():
    assert parse_hostfile(str(ROOT / "hostfile.example"), resolve=False) == {"node-1": 8, "node-2": 8}


@pytest.mark.parametrize("text, line, problem", [
    ("localhost slots=8\nnode-2\n", 2, "expected 'HOST slots=N'"),
    ("localhost slots=0\n", 1, "slots must be a positive integer, got '0'"),
    ("localhost slots=-1\n", 1, "slots must be a positive integer, got '-1'"),
    ("localhost slots=two\n", 1, "slots must be a positive integer, got 'two'"),
    ("localhost slots=1.5\n", 1, "slots must be a positive integer, got '1.5'"),
    ("localhost slots=\n", 1, "expected 'HOST slots=N'"),
    ("localhost slot=8\n", 1, "expected 'HOST slots=N'"),
    ("localhost slots=8 gpus=2\n", 1, "expected 'HOST slots=N'"),
    ("# c\nlocalhost slots=8\n\nlocalhost slots=4\n", 4, "host 'localhost' listed twice (first on line 2)"),
    ("localhost slots=8\nno-such-host.invalid slots=8\n", 2, "host 'no-such-host.invalid' does not resolve"),
])
def test_bad_line_names_file_line_and_problem(tmp_path, capsys, text, line, problem):
    path = write(tmp_path, text)
    with pytest.raises(HostfileError, match="line"):
        parse_hostfile(str(path))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} line {line}: {problem}"), err


@pytest.mark.parametrize("text, message", [(None, "no such hostfile"), ("# only\n\n", "no hosts")])
def test_missing_or_empty_file(tmp_path, capsys, text, message):
    path = tmp_path / "hostfile"
    if text is not None:
        path.write_text(text)
    assert main([str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: {message}" + (" (every line is blank or a comment)\n"
                                                                        if text else "\n")


def launch_sh(tmp_path, *args):
    """launch.sh with a deepspeed stub on PATH that records its arguments and DS_ENV_FILE's content."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    # launch.sh runs the python beside deepspeed (ds_face.hostfile, ds_face.preflight): the venv's, by a
    # wrapper (a symlink would lose the venv: python finds pyvenv.cfg beside the path it was started by)
    (stub / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (stub / "python").chmod(0o755)
    (stub / "deepspeed").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD"\n'
                                    '[ -n "$DS_ENV_FILE" ] && cat "$DS_ENV_FILE" > "$RECORD.env"\nexit 0\n')
    (stub / "deepspeed").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DS_FACE_", "HF_", "OMP_", "DS_ENV_FILE"))}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.update(PATH=f"{stub}:{env['PATH']}", RECORD=str(tmp_path / "record"), HOME=str(home),
               PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path / "tmp"))
    return env, stub


@pytest.mark.parametrize("text, problem", [("localhost slots=8\nlocalhost slots=8\n", "line 2: host 'localhost' listed twice"),
                                           (None, ": no such hostfile")])
def test_launch_sh_stops_on_a_bad_hostfile_before_the_runner(tmp_path, text, problem):
    env, _ = launch_sh(tmp_path)
    bad = write(tmp_path, text) if text else tmp_path / "missing"
    proc = subprocess.run([str(ROOT / "launch.sh"), "configs/cpu_demo.yaml", "ds_configs/cpu_zero2_fp32.json",
                           "-H", str(bad)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"error: {bad}{' ' if text else ''}{problem}" in proc.stderr
    assert not (tmp_path / "record").exists(), "deepspeed must not start"


def test_launch_sh_forwards_env_through_a_merged_deepspeed_env(tmp_path):
    env, _ = launch_sh(tmp_path)
    (tmp_path / "home" / ".deepspeed_env").write_text("NCCL_SOCKET_IFNAME=eth0\n\n# comment\nFOO=bar baz\n")
    good = write(tmp_path, "localhost slots=1\n127.0.0.1 slots=1\n")
    env.update(DS_FACE_TIMEOUT_MIN="5", OMP_NUM_THREADS="4", HF_DATASETS_OFFLINE="1", UNRELATED="x")
    proc = subprocess.run([str(ROOT / "launch.sh"), "configs/cpu_demo.yaml", "ds_configs/cpu_zero2_fp32.json",
                           f"--hostfile={good}", "--master_addr", "localhost", "--set", "schedule.max_steps=2",
                           "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "record").read_text().splitlines()
    assert args == [f"--hostfile={good}", "--master_addr", "localhost", "--module", "ds_face.train",
                    "--config", "configs/cpu_demo.yaml", "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json",
                    "--set", "schedule.max_steps=2", "--resume"]
    lines = (tmp_path / "record.env").read_text().splitlines()
    assert lines[:2] == ["NCCL_SOCKET_IFNAME=eth0", "FOO=bar baz"], "the user's lines first, blank/comments dropped"
    assert set(lines[2:]) == {"DS_FACE_TIMEOUT_MIN=5", "OMP_NUM_THREADS=4", "HF_DATASETS_OFFLINE=1"}
    assert not list((tmp_path / "tmp").iterdir()), "the merged file is removed afterwards"
    assert (tmp_path / "home" / ".deepspeed_env").read_text().startswith("NCCL_SOCKET_IFNAME=eth0\n"), "untouched"
