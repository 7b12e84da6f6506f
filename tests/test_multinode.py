"""ds_face's multi-node runner (ds_face/launch/multinode.py, what `launch.sh --hostfile` runs).

Real two-host launches (pdsh-style ssh to a private loopback sshd on 127.0.0.1 and 127.0.0.2:
tests/multinode/run_two_hosts.sh) are skipped where sshd/ssh is missing (Debian: apt-get install -y
openssh-server openssh-client pdsh; pdsh only runs the control showing what DeepSpeed's own runner did).
The other tests need no sshd: the quoted command line run by a real POSIX shell, the refusals through the
real launch.sh, and a one-host launch (no ssh, as DeepSpeed's runner) stopped by SIGTERM.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_face.launch.multinode import LaunchError, node_environment, remote_command

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)
SCRIPT = ROOT / "tests" / "multinode" / "run_two_hosts.sh"
SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").is_file() else None)
MISSING = [name for name, path in (("sshd", SSHD), ("ssh", shutil.which("ssh")),
                                   ("ssh-keygen", shutil.which("ssh-keygen"))) if not path]
needs_sshd = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed (Debian: apt-get install "
                                "-y openssh-server openssh-client pdsh); the two-host launch tests need them")


def two_hosts(*args, timeout=480):
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout


@needs_sshd
def test_two_hosts_over_ssh_train_and_checkpoint_with_hostile_values_arriving_verbatim():
    """One real launch for both (``run_two_hosts.sh --hostile``): started from a hostile directory with hostile
    values, it trains 6 steps and checkpoints with every check of the plain run (``check_trained``)."""
    out = two_hosts("--hostile")
    assert "run_two_hosts: OK: 2 nodes x 1 rank, checkpoint step_6" in out
    assert "transport: OK: 27 hostile values verbatim on both hosts, no marker; kill -9 stops only its launch" in out
    assert "run_two_hosts: OK: launch from '" in out and "arrived verbatim, no marker" in out


@needs_sshd
@pytest.mark.parametrize("rank", [0, 1])
def test_killing_one_node_rank_stops_both_nodes(rank):
    assert f"run_two_hosts: OK: rank {rank} killed" in two_hosts("--kill-rank", str(rank))


@needs_sshd
def test_a_stop_ends_one_launch_on_both_nodes_and_not_another_from_the_same_venv():
    out = two_hosts("--stop")
    assert "none of its processes left; the second finished step 8" in out


# -- no sshd needed ---------------------------------------------------------------------------------------------

HOSTILE = ["two words", "$(touch pwned1)", "`touch pwned2`", "x;touch pwned3", "a'b\"c'\"; touch pwned4; echo \"",
           "a\\b\\\\", "line1\ntouch pwned5", "* ? [a-z] {a,b}", "-n", "~root", "$HOME ${IFS}", "%n %h", "!!",
           ">pwned6 | touch pwned7 && touch pwned8", "naïve 名前 😀", "", "x" * 30_000]


def test_the_node_command_line_is_quoted_by_construction(tmp_path):
    """remote_command's line run by a real POSIX shell (/bin/sh, as sshd would): everything arrives verbatim."""
    cwd = tmp_path / "dir with space $(touch pwned9) 'q' ;x"
    cwd.mkdir()
    source = tmp_path / "activate `touch pwned10`"
    source.write_text("export DS_FACE_SOURCED=yes\n")
    env = {f"DS_FACE_V{i}": value for i, value in enumerate(HOSTILE)}
    show = ("import json, os, sys; print(json.dumps([os.getcwd(), sys.argv[1:], "
            "{k: v for k, v in os.environ.items() if k.startswith('DS_FACE_')}]))")
    line = remote_command([sys.executable, "-c", show, *HOSTILE], str(cwd), env, str(source))
    proc = subprocess.run(["/bin/sh", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [str(cwd), HOSTILE, {**env, "DS_FACE_SOURCED": "yes"}]
    assert not list(tmp_path.rglob("pwned*"))


@pytest.mark.parametrize("env, expect", [
    ({"A;touch pwned=1": "x"}, "environment variable 'A;touch pwned=1' is not an environment variable name"),
    ({"$(id)": "x"}, "environment variable '$(id)' is not an environment variable name"),
    ({"A B": "x"}, "'A B' is not an environment variable name"),
    ({"1A": "x"}, "'1A' is not an environment variable name"),
    ({"DS_FACE_BIG": "x" * 200_000}, "the command for each node would be 2000"),
])
def test_values_that_cannot_be_sent_are_refused(env, expect):
    with pytest.raises(LaunchError) as err:
        remote_command(["true"], "/", env)
    assert expect in str(err.value)


def test_node_environment_forwards_the_documented_variables_and_deepspeed_env(tmp_path):
    home, here = tmp_path / "home", tmp_path / "here"
    home.mkdir(), here.mkdir()
    (home / ".deepspeed_env").write_text("NCCL_SOCKET_IFNAME=eth0\n\n# comment\nFOO=bar baz $(x) \n")
    (here / ".deepspeed_env").write_text("FOO=from here\n")
    environ = {"HOME": str(home), "DS_FACE_TIMEOUT_MIN": "5", "OMP_NUM_THREADS": "4", "HF_HOME": "/h f",
               "GLOO_SOCKET_IFNAME": "lo", "TORCH_DISTRIBUTED_DEBUG": "INFO", "UNRELATED": "x", "PATH": "/bin"}
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)  # os.path.expanduser reads it
    try:
        env = node_environment(environ, str(here))
        (home / ".deepspeed_env").write_text("BAD KEY=1\n")
        with pytest.raises(LaunchError, match=r"\.deepspeed_env line 1: 'BAD KEY' is not an environment variable"):
            node_environment(environ, str(here))
    finally:
        os.environ["HOME"] = old
    assert env == {"DS_FACE_TIMEOUT_MIN": "5", "GLOO_SOCKET_IFNAME": "lo", "HF_HOME": "/h f", "OMP_NUM_THREADS": "4",
                   "TORCH_DISTRIBUTED_DEBUG": "INFO", "NCCL_SOCKET_IFNAME": "eth0", "FOO": "from here",
                   "PYTHONPATH": str(here)}
    with pytest.raises(LaunchError, match=r"environment variable 'DS_FACE_X;touch pwned' is not an environment"):
        node_environment({"DS_FACE_X;touch pwned": "1"}, str(here))


def launch(tmp_path, *args, env=None, hostfile="127.0.0.1 slots=1\n127.0.0.2 slots=1\n", cwd=ROOT):
    """launch.sh with a hostfile; `ssh` on PATH is a stub that records being called (it must not be)."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "ssh").write_text(f'#!/bin/sh\ntouch "{tmp_path}/ssh_called"\nexit 255\n')
    (stub / "ssh").chmod(0o755)
    (tmp_path / "hostfile").write_text(hostfile)
    environ = {**os.environ, "PATH": f"{stub}:{BIN}:{os.environ['PATH']}", **(env or {})}
    return subprocess.run([str(ROOT / "launch.sh"), str(ROOT / "configs/cpu_demo.yaml"),
                           str(ROOT / "ds_configs/cpu_zero2_fp32.json"), "--hostfile", str(tmp_path / "hostfile"),
                           *args, "--set", f"output.dir={tmp_path / 'run'}"], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=120)


REFUSED = [  # (launch.sh arguments, environment, hostfile, the refusal)
    (["--master_addr", "127.0.0.1;touch pwned"], {}, None, "--master_addr '127.0.0.1;touch pwned' is neither an IP"),
    (["--master_addr", "$(touch pwned)"], {}, None, "--master_addr '$(touch pwned)' is neither an IP address"),
    (["--master_addr", "a\ntouch pwned"], {}, None, "--master_addr 'a\\ntouch pwned' is neither"),
    (["--master_addr", "-oProxyCommand=touch pwned"], {}, None, "--master_addr '-oProxyCommand=touch pwned' is"),
    (["--master_addr", "nöde"], {}, None, "--master_addr 'nöde' is neither an IP address nor a host name"),
    (["--master_addr", "a" * 300], {}, None, "(300 characters) is neither an IP address nor a host name"),
    (["--master_port", "1;touch pwned"], {}, None, "--master_port '1;touch pwned' is not a TCP port"),
    (["--master_port", "65536"], {}, None, "--master_port '65536' is not a TCP port (an integer from 1 to 65535)"),
    (["--ssh_port", "$(touch pwned)"], {}, None, "--ssh_port '$(touch pwned)' is not a TCP port"),
    (["--num_gpus", "1;x"], {}, None, "--num_gpus '1;x' is not a positive integer"),
    (["--include", "127.0.0.1;touch pwned"], {}, None, "--include '127.0.0.1;touch pwned': host '127.0.0.1;touch "
                                                       "pwned' is not in the hostfile"),
    (["--launcher", "openmpi"], {}, None, "--launcher 'openmpi': a hostfile launch goes through ds_face's ssh runner"),
    (["--launcher_args", "-R exec"], {}, None, "'--launcher_args': not an option of launch.sh's multi-node runner"),
    (["--save_pid"], {}, None, "'--save_pid': not an option of launch.sh's multi-node runner"),
    (["--enable_each_rank_log", "None"], {}, None, "--enable_each_rank_log 'None': expected a path"),
    ([], {"DS_FACE_X;touch pwned": "1"}, None, "environment variable 'DS_FACE_X;touch pwned' is not an environment"),
    ([], {"DS_ENV_FILE": "evil_env"}, None, "evil_env line 1: '$(touch pwned)X' is not an environment variable"),
    ([], {}, "127.0.0.1;touch${IFS}pwned slots=1\n", "line 1: host '127.0.0.1;touch${IFS}pwned' is not a host name"),
    ([], {}, "-oProxyCommand=touch slots=1\n", "line 1: host '-oProxyCommand=touch' is not a host name"),
    ([], {}, "127.0.0.1 slots=99999999999999999999\n", "slots must be an integer from 1 to 1024, got '9999"),
    ([], {}, "127.0.0.1 slots=1\n127.0.0.1 slots=2\n", "line 2: host '127.0.0.1' listed twice (first on line 1)"),
]


@pytest.mark.parametrize("args, env, hostfile, expect", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_launch_sh_refuses_values_that_are_not_of_their_kind(tmp_path, args, env, hostfile, expect):
    (tmp_path / "evil_env").write_text("$(touch pwned)X=1\n")
    proc = launch(tmp_path, *args, env=env, cwd=tmp_path,
                  **({"hostfile": hostfile} if hostfile else {}))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch.sh: error: "), proc.stderr
    assert expect in lines[0], lines[0]
    assert not (tmp_path / "ssh_called").exists() and not (tmp_path / "run").exists(), "nothing may start"
    assert not list(tmp_path.rglob("pwned*")) and not list(ROOT.glob("pwned*"))


def test_force_multi_without_a_hostfile_is_refused(tmp_path):
    proc = subprocess.run([str(ROOT / "launch.sh"), "configs/cpu_demo.yaml", "ds_configs/cpu_zero2_fp32.json",
                           "--force_multi", "--set", f"output.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("launch.sh: error: --force_multi without --hostfile: name the hosts in a hostfile "
                                   "(ds_face's multi-node runner)")


def test_a_one_host_hostfile_runs_here_and_sigterm_stops_exactly_it(tmp_path):
    """One host, as DeepSpeed's runner: no ssh. A SIGTERM to launch.sh stops its node guard, launcher and ranks."""
    out = tmp_path / "run"
    environ = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DS_FACE_TIMEOUT_MIN": "3"}
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([str(ROOT / "launch.sh"), "configs/cpu_demo.yaml", "ds_configs/cpu_zero2_fp32.json",
                                 "--hostfile", str(tmp_path / "hostfile"), "--set", "schedule.max_steps=300",
                                 "--set", "output.log_every=1", "--set", f"output.dir={out}"], cwd=ROOT,
                                env=environ, stdout=log, stderr=subprocess.STDOUT)
    import psutil

    def ours():
        return [p for p in psutil.process_iter(["pid", "cmdline"]) if p.info["pid"] != os.getpid()
                and f"output.dir={out}" in " ".join(p.info["cmdline"] or ())]
    deadline = time.monotonic() + 300
    while len(ours()) < 5:  # the runner, the node guard, DeepSpeed's launch.py, 2 ranks (the two-host test
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.2)  # --stop stops a launch mid-training; this one stops it while the ranks start)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    log = (tmp_path / "log").read_text()
    assert "ds_face.launch.multinode: 1 host(s): localhost (here, no ssh)" in log
    assert "localhost: " in log and "node_rank=0" in log  # the node's output, prefixed with its host
    assert not ours(), [p.info["cmdline"] for p in ours()]
    assert not (out / "checkpoints").exists()
