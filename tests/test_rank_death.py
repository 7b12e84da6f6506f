"""kill -9 one rank mid-training: the launch stops non-zero within bounded time and says which rank died."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from ds_face.runtime.spawn import free_port

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def rank_pid(rank: int, out: Path) -> int:
    pids = [p.pid for p in psutil.process_iter(["cmdline"])
            if f"--local_rank={rank}" in (p.info["cmdline"] or []) and f"output.dir={out}" in (p.info["cmdline"] or [])]
    assert len(pids) == 1, pids
    return pids[0]


def progress(out: Path) -> str:
    return (out / "training.log").read_text() if (out / "training.log").exists() else ""


def test_kill_one_rank_stops_the_launch_and_names_it(tmp_path):
    out = tmp_path / "run"
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ds_face.train",
           "--config", "configs/cpu_demo.yaml", "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json",
           "--set", "output.log_every=1", "--set", f"output.dir={out}"]  # 300 steps: minutes, unless stopped
    with open(tmp_path / "launch.log", "w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while "Global Step: 2/" not in progress(out):
                assert proc.poll() is None, "the launch ended before training started"
                assert time.monotonic() < deadline, "training did not start"
                time.sleep(0.5)
            victim = rank_pid(1, out)
            os.kill(victim, signal.SIGKILL)
            returncode = proc.wait(timeout=90)  # the bound: TimeoutExpired if any rank lingers
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.seek(0)
        output = log.read()
    assert returncode != 0, output[-3000:]
    assert "ds_face.train: rank 0: " in output and f"rank 1 (pid {victim}) died" in output, output[-3000:]
    assert not any(f"output.dir={out}" in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])), \
        "a rank outlived the launch"


LAUNCHER = r"""
import os, subprocess, sys
env = dict(os.environ, WORLD_SIZE="2")
# rank 1 exits 1 s after rank 0 has first asked whether it died (rank 0 creates the file sys.argv[2] then)
LATE = "import os, sys, time\nwhile not os.path.exists(sys.argv[1]): time.sleep(0.05)\ntime.sleep(1)"
late = subprocess.Popen([sys.executable, "-c", LATE, sys.argv[2]], env=dict(env, RANK="1", LOCAL_RANK="1"))
watcher = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=dict(env, RANK="0", LOCAL_RANK="0"))
print(late.pid, flush=True)
sys.exit(watcher.wait() or late.wait())
"""

WATCHER = r"""
import sys, time
from ds_face.runtime.supervise import watch_sibling_ranks
dead = watch_sibling_ranks(0)
print(repr(dead()), flush=True)
open(sys.argv[1], "w").close()
started = time.monotonic()
print(repr(dead(wait=60)), round(time.monotonic() - started, 1), flush=True)
"""


def test_a_sibling_whose_exit_shows_late_is_still_named(tmp_path):
    """What a failed collective does: the sibling is still there when asked (as a killed rank is while the kernel
    tears it down), and `dead(wait)` names it as soon as its exit shows, well before the bound."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, WATCHER, str(tmp_path / "asked")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pid, now, later = proc.stdout.splitlines()
    assert now == "''"
    named, waited = later.rsplit(" ", 1)
    assert named == repr(f"rank 1 (pid {pid}) died") and float(waited) < 30, proc.stdout
