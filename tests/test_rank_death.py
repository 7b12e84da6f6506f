"""kill -9 one rank mid-training: the launch stops non-zero within bounded time and says which rank died."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from ds_face.spawn import free_port

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
    assert f"ds_face.train: rank 0: " in output and f"rank 1 (pid {victim}) died" in output, output[-3000:]
    assert not any(f"output.dir={out}" in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])), \
        "a rank outlived the launch"
