"""``python -m ds_face.launch.recovery_bench``: how long an elastic run stands still after a node is lost.

Two torch elastic agents on this machine stand in for two hosts (127.0.0.1, hosting the rendezvous store, and
127.0.0.2), each started with the command ``launch.sh --elastic`` sends a host (``ds_face.launch.elastic.
agent_command``: the same rendezvous settings), training a small run of ``ds_face.train`` (r_tiny, synthetic data,
1 CPU rank per node, a checkpoint every 3 steps). Once rank 0 has finished ``--kill-after`` steps, the second
agent and its worker are SIGKILLed together; the survivor's agent restarts its worker alone, which resumes
``latest``. Printed: the seconds from the SIGKILL to the end of the first optimizer step after it, and where they
went (the survivor's worker noticing and exiting; the rendezvous and the new worker's start; its resume and
first step). The step times are rank 0's, from ``<output.dir>/last_step.json`` (written under the elastic launch
after every step).

    python -m ds_face.launch.recovery_bench [--kill-after 8] [--repeat 1] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ds_face.launch.elastic import AGENT_ENV, ENV_RUN_ID, agent_command

RUN_YAML = """\
model: {{backbone: r_tiny, embedding_size: 32}}
head: {{num_classes: 64, sample_rate: 1.0}}
optimizer: {{name: sgd, lr: 0.1, momentum: 0.9}}
schedule: {{epochs: 1, warmup_epochs: 0}}
data: {{source: synthetic, num_samples: 960}}
output: {{dir: {out}, log_every: 10, tensorboard: false}}
checkpoint: {{every_steps: 3, keep_last: 2}}
seed: 7
"""
DS_JSON = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
TIMEOUT_S = 600


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_step(out: Path) -> dict | None:
    try:
        return json.loads((out / "last_step.json").read_text())
    except (OSError, ValueError):
        return None


def workers(agent: subprocess.Popen) -> list[int]:
    import psutil
    try:
        return [p.pid for p in psutil.Process(agent.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def wait_until(what: str, condition, agents, poll: float = 0.01):
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        value = condition()
        if value:
            return value
        if any(a.poll() is not None for a in agents) or time.monotonic() > deadline:
            raise RuntimeError(f"no {what}: an agent exited or {TIMEOUT_S} s passed (logs in the work directory)")
        time.sleep(poll)


def measure_once(work: Path, kill_after: int) -> dict:
    """One 2-node run, one node lost after ``kill_after`` steps: the phases of its recovery, in seconds."""
    import psutil
    work.mkdir(parents=True)
    out = work / "out"
    (work / "run.yaml").write_text(RUN_YAML.format(out=out))
    (work / "ds.json").write_text(json.dumps(DS_JSON))
    port, run_id = free_port(), f"bench{os.getpid()}x{int(time.time())}"
    args = ["--config", str(work / "run.yaml"), "--deepspeed_config", str(work / "ds.json")]
    env = {**os.environ, **AGENT_ENV, ENV_RUN_ID: run_id, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    agents = []
    try:
        for host in ("127.0.0.1", "127.0.0.2"):
            cmd = agent_command(host, first="127.0.0.1", port=port, slots=1, min_nodes=1, max_nodes=2,
                                max_restarts=3, run_id=run_id, trainer_args=args)
            with open(work / f"agent_{host}.log", "w") as log:
                agents.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        survivor, lost = agents
        wait_until(f"step {kill_after}", lambda: (last_step(out) or {}).get("step", 0) >= kill_after, agents)
        old_worker = workers(survivor)
        victims = [lost.pid, *workers(lost)]
        killed_at = time.time()
        for pid in victims:  # the node and everything on it, at once
            os.kill(pid, signal.SIGKILL)
        lost.wait()
        step_at_kill = last_step(out)["step"]
        gone = psutil.wait_procs([psutil.Process(pid) for pid in old_worker], timeout=TIMEOUT_S)[0]
        failed_at = time.time() if gone else float("nan")
        new_worker = wait_until("new worker", lambda: [p for p in workers(survivor) if p not in old_worker],
                                [survivor])
        started_at = psutil.Process(new_worker[0]).create_time()
        first = wait_until("step after the recovery",
                           lambda: (s := last_step(out)) and s["time"] > failed_at and s, [survivor])
        survivor.wait(timeout=TIMEOUT_S)
        return {"total": first["time"] - killed_at, "noticed": failed_at - killed_at,
                "restarted": started_at - failed_at, "first_step": first["time"] - started_at,
                "step_at_kill": step_at_kill, "resumed_step": first["step"] - 1, "rc": survivor.returncode}
    finally:
        for agent in agents:
            if agent.poll() is None:
                for pid in [agent.pid, *workers(agent)]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_face.launch.recovery_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--kill-after", type=int, default=8, help="steps rank 0 finishes before the loss (default 8)")
    parser.add_argument("--repeat", type=int, default=1, help="runs to measure (default 1)")
    parser.add_argument("--keep", help="work directory to keep (default: a temporary one, removed)")
    opts = parser.parse_args(argv)
    if not 1 <= opts.kill_after <= 25 or not 1 <= opts.repeat <= 20:
        parser.error("--kill-after is 1 to 25 (the run has 30 steps), --repeat 1 to 20")
    root = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="ds_face_recovery_"))
    results = []
    for i in range(opts.repeat):
        r = measure_once(root / f"run{i}", opts.kill_after)
        results.append(r)
        print(f"run {i}: {r['total']:.1f} s from SIGKILL of node 2 to the first step after it (survivor's worker "
              f"failed {r['noticed']:.1f} s after the kill; new worker started {r['restarted']:.1f} s later; "
              f"resumed step_{r['resumed_step']} and finished its first step {r['first_step']:.1f} s after "
              f"starting); killed after step {r['step_at_kill']}; run exit status {r['rc']}", flush=True)
    totals = [r["total"] for r in results]
    print(f"recovery (SIGKILL -> first step, 2 -> 1 nodes, r_tiny, 1 CPU rank per node, {os.cpu_count()} CPUs): "
          f"median {statistics.median(totals):.1f} s over {len(totals)} run(s)")
    if not opts.keep:
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
