"""The hostfile check launch.sh runs before any rank starts (python -m ds_face.launch.hostfile, launch.sh --hostfile)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_face.launch.hostfile import host_problem, HostfileError, main, parse_hostfile, select_slots

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
    ("localhost slots=0\n", 1, "slots must be an integer from 1 to 1024, got '0'"),
    ("localhost slots=-1\n", 1, "slots must be an integer from 1 to 1024, got '-1'"),
    ("localhost slots=two\n", 1, "slots must be an integer from 1 to 1024, got 'two'"),
    ("localhost slots=1.5\n", 1, "slots must be an integer from 1 to 1024, got '1.5'"),
    ("localhost slots=1025\n", 1, "slots must be an integer from 1 to 1024, got '1025'"),
    ("localhost slots=99999999999999999999\n", 1, "slots must be an integer from 1 to 1024, got '99999999999999999999'"),
    ("localhost slots=\u0663\n", 1, "slots must be an integer from 1 to 1024, got '\u0663'"),  # an Arabic-Indic 3
    ("localhost slots=0x8\n", 1, "slots must be an integer from 1 to 1024, got '0x8'"),
    ("a;touch${IFS}x slots=1\n", 1, "host 'a;touch${IFS}x' is not a host name (RFC 1123"),
    ("$(touch${IFS}x) slots=1\n", 1, "host '$(touch${IFS}x)' is not a host name"),
    ("-oProxyCommand=x slots=1\n", 1, "host '-oProxyCommand=x' is not a host name"),
    ("user@node-1 slots=1\n", 1, "host 'user@node-1' is not a host name"),
    ("node_1 slots=1\n", 1, "host 'node_1' is not a host name"),
    ("nöde slots=1\n", 1, "host 'nöde' is not a host name"),
    ("node-.x slots=1\n", 1, "host 'node-.x' is not a host name"),
    ("a..b slots=1\n", 1, "host 'a..b' is not a host name"),
    ("*.example slots=1\n", 1, "host '*.example' is not a host name"),
    ("%h slots=1\n", 1, "host '%h' is not a host name"),
    ("a" * 64 + " slots=1\n", 1, "host 'aaaaaaaa"),
    ("localhost\u00a0slots=1\n", 1, "expected 'HOST slots=N'"),  # a no-break space is not a separator here
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


@pytest.mark.parametrize("host", ["node-1", "a.b.example.com", "127.0.0.2", "::1", "fe80::1", "N0DE", "1" * 63,
                                  ".".join(["a" * 63] * 3) + ".b"])
def test_host_names_and_addresses_that_pass(host):
    assert host_problem(host) is None


def test_a_big_or_binary_hostfile_is_refused(tmp_path):
    path = write(tmp_path, "localhost slots=1\n" + "# x\n" * 300_000)
    with pytest.raises(HostfileError, match="larger than 1048576 bytes"):
        parse_hostfile(str(path))
    path.write_bytes(b"localhost slots=1\n\xff\n")
    with pytest.raises(HostfileError, match="not UTF-8 text"):
        parse_hostfile(str(path))


HOSTS = {"a": 4, "b": 2, "c": 1}


@pytest.mark.parametrize("options, expect", [
    ({}, {"a": [0, 1, 2, 3], "b": [0, 1], "c": [0]}),
    ({"include": "b@a:1,3"}, {"a": [1, 3], "b": [0, 1]}),
    ({"include": "a:2,2"}, {"a": [2]}),
    ({"exclude": "a:0@c"}, {"a": [1, 2, 3], "b": [0, 1]}),
    ({"exclude": "b:0,1"}, {"a": [0, 1, 2, 3], "c": [0]}),
    ({"num_nodes": 2}, {"a": [0, 1, 2, 3], "b": [0, 1]}),
    ({"num_gpus": 1}, {"a": [0], "b": [0], "c": [0]}),
    ({"num_nodes": 2, "num_gpus": 2}, {"a": [0, 1], "b": [0, 1]}),
])
def test_select_slots_as_deepspeed(options, expect):
    assert select_slots(HOSTS, **options) == expect


@pytest.mark.parametrize("options, problem", [
    ({"include": "a", "exclude": "b"}, "--include and --exclude cannot be used together"),
    ({"include": "a", "num_gpus": 1}, "--num_nodes/--num_gpus cannot be used with --include/--exclude"),
    ({"include": "d"}, "--include 'd': host 'd' is not in the hostfile"),
    ({"include": "a;id"}, "--include 'a;id': host 'a;id' is not in the hostfile"),
    ({"include": "a:4"}, "--include 'a:4': slot '4' of a is not one of 0-3 (slots=4)"),
    ({"include": "a:x"}, "--include 'a:x': slot 'x' of a is not one of 0-3"),
    ({"exclude": "a:-1"}, "--exclude 'a:-1': slot '-1' of a is not one of 0-3"),
    ({"exclude": "a@b@c"}, "no slots left to run on after --include/--exclude"),
    ({"num_nodes": 4}, "--num_nodes 4: the hostfile has 3 hosts"),
    ({"num_gpus": 3}, "--num_gpus 3: more than the slots of b, c (slots=1)"),
])
def test_select_slots_refusals_name_the_option(options, problem):
    with pytest.raises(HostfileError) as err:
        select_slots(HOSTS, **options)
    assert str(err.value).startswith(problem), str(err.value)


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
    # launch.sh runs the python beside deepspeed (ds_face.launch.hostfile, ds_face.launch.preflight): the venv's, by a
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
