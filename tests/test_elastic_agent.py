"""Unattended recovery under torch's elastic agent (issue 25): real agents, real workers, real SIGKILLs.

Two torch elastic agents (``python -m torch.distributed.run``, c10d rendezvous) on this machine stand in for two
hosts: one on 127.0.0.1 hosting the rendezvous store, one on 127.0.0.2; one CPU rank (gloo) per node. A "node
loss" is a SIGKILL of the second agent and its workers together (no goodbye). The workers run ``ds_face.train``
through ``tests.elastic_worker``, which writes every optimizer step down (loss, LR, world size, the (epoch, row)
of each trained sample) so that what the run kept can be checked after the kills: every sample of the epoch
trained exactly once, the last LR 0. One test goes through ``launch.sh --elastic`` over real ssh to a private
loopback sshd (skipped, saying why, where sshd is missing; CI installs it with ``make multinode-tools``).

The ds JSON is micro-batch 8 x accumulation 2: the global batch is kept through every resize (2 ranks x 8 x 2 =
1 rank x 8 x 4 = 32), so every step of every round is a whole step of the same run.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ds_face.runtime.spawn import free_port
from tests.elastic_worker import kept_steps, read_steps

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 640  # one epoch; 20 steps of 32 (the loss and 2-1-2-1 tests), 40 of 16 (the join test)
RUN_YAML = """\
model: {{backbone: r_tiny, embedding_size: 32}}
head: {{num_classes: 64, sample_rate: 1.0}}
optimizer: {{name: sgd, lr: 0.1, momentum: 0.9}}
schedule: {{epochs: 1, warmup_epochs: 0}}
data: {{source: synthetic, num_samples: {samples}}}
output: {{dir: {out}, log_every: 1, tensorboard: false}}
checkpoint: {{every_steps: 3, keep_last: 0}}
seed: 7
"""
DS_JSON = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2},
           "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
DEADLINE_S = 300  # for any one wait on a loaded 2-core machine; a healthy test takes far less


class Run:
    """One elastic run's files: configs, output.dir, the step records, the agents' logs."""

    def __init__(self, tmp_path: Path):
        self.dir = tmp_path
        self.out = tmp_path / "out"
        self.steps = tmp_path / "steps"
        self.steps.mkdir()
        (tmp_path / "run.yaml").write_text(RUN_YAML.format(samples=SAMPLES, out=self.out))
        (tmp_path / "ds.json").write_text(json.dumps(DS_JSON))
        self.port = free_port()
        self.run_id = f"test{os.getpid()}x{self.port}"
        self.agents: list[subprocess.Popen] = []

    def trainer_args(self) -> list[str]:
        return ["--config", str(self.dir / "run.yaml"), "--deepspeed_config", str(self.dir / "ds.json")]

    def env(self, **extra) -> dict:
        return {**os.environ, "OMP_NUM_THREADS": "1", "DS_FACE_TIMEOUT_MIN": "3",
                "DS_FACE_TEST_LEDGER": str(self.steps), **extra}

    def agent(self, address: str, nnodes: str = "1:2", max_restarts: int = 3) -> subprocess.Popen:
        """An elastic agent as ds_face.launch.elastic starts one on each host, ``address`` standing for the host."""
        from ds_face.launch.elastic import AGENT_ENV, RDZV_TIMING
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes, "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{self.port}", "--rdzv-id", self.run_id,
               "--rdzv-conf", f"is_host={int(address == '127.0.0.1')},{RDZV_TIMING}", "--local-addr", address,
               "--max-restarts", str(max_restarts), "-m", "tests.elastic_worker", *self.trainer_args()]
        log = open(self.dir / f"agent{len(self.agents)}_{address}.log", "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(**AGENT_ENV, DS_FACE_ELASTIC_RUN=self.run_id), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.agents.append(proc)
        return proc

    def records(self) -> list[dict]:
        return read_steps(self.steps)

    def wait_for(self, what: str, predicate, survivor: subprocess.Popen):
        deadline = time.monotonic() + DEADLINE_S
        while not predicate(self.records()):
            assert survivor.poll() is None, f"the agent exited {survivor.returncode} waiting for {what}\n{self.logs()}"
            assert time.monotonic() < deadline, f"no {what} after {DEADLINE_S} s\n{self.logs()}"
            time.sleep(0.05)

    def wait_step(self, step: int, world: int, survivor, after: float = 0.0):
        """Until rank 0 of a ``world``-rank round has finished ``step`` (or a later one), after time ``after``."""
        self.wait_for(f"step {step} on {world} rank(s)", lambda records: any(
            r["rank"] == 0 and r["world"] == world and r["step"] >= step and r["time"] > after for r in records),
            survivor)

    def finish(self, survivor: subprocess.Popen) -> int:
        try:
            return survivor.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not finish in {DEADLINE_S} s\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.dir.glob("*.log")))

    def stop_all(self):
        for proc in self.agents:
            if proc.poll() is None:
                kill_node(proc)


def kill_node(agent: subprocess.Popen) -> float:
    """SIGKILL an agent and every process under it (its workers run in sessions of their own), all at once, as
    a node that loses power; returns the time of the kill."""
    try:
        victims = [agent.pid] + [p.pid for p in psutil.Process(agent.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    killed_at = time.time()
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait(timeout=30)
    return killed_at


@pytest.fixture
def run(tmp_path):
    r = Run(tmp_path)
    yield r
    r.stop_all()


def check_every_sample_once(kept: dict[int, list[dict]]):
    """The steps the run kept trained each sample of the epoch exactly once, ending on LR 0."""
    steps = sorted(kept)
    assert steps == list(range(1, len(steps) + 1)), steps
    rows = [tuple(row) for step in steps for record in kept[step] for row in record["rows"]]
    assert sorted(rows) == [(0, i) for i in range(SAMPLES)]
    last = kept[steps[-1]][0]
    assert last["samples"] == SAMPLES and last["lr"] == 0.0, last


def rounds(records: list[dict]) -> list[tuple[int, int]]:
    """(world size, first step) of each round of workers, in order, from rank 0's records."""
    found, pid = [], None
    for r in records:
        if r["rank"] == 0 and r["pid"] != pid:
            pid = r["pid"]
            found.append((r["world"], r["step"]))
    return found


def saved_steps(out: Path) -> set[int]:
    return {int(p.name[len("step_"):]) for p in (out / "checkpoints").glob("step_*")}


# -- node loss ----------------------------------------------------------------------------------------------

def test_node_loss_the_survivor_finishes_every_sample_once_as_a_resume_by_hand(run):
    first = run.agent("127.0.0.1")
    second = run.agent("127.0.0.2")
    run.wait_step(7, 2, first)
    kill_node(second)
    assert run.finish(first) == 0, run.logs()

    records = run.records()
    kept = kept_steps(records)
    check_every_sample_once(kept)
    (world_before, _), (world_after, resumed_step) = rounds(records)[0], rounds(records)[-1]
    assert (world_before, world_after) == (2, 1), rounds(records)
    resumed_from = resumed_step - 1
    assert resumed_from in saved_steps(run.out) and 6 <= resumed_from <= 18
    log = (run.out / "training.log").read_text()
    assert log.count("recovery: world size 2 -> 1") == 1, log[-3000:]

    # The same checkpoint resumed by hand (--resume, no elastic launch) on the same number of ranks: the same
    # losses, bit for bit, and the same LRs.
    by_hand = run.dir / "by_hand"
    (by_hand / "checkpoints").mkdir(parents=True)
    shutil.copytree(run.out / "checkpoints" / f"step_{resumed_from}", by_hand / "checkpoints" / f"step_{resumed_from}")
    (by_hand / "checkpoints" / "latest").write_text(f"step_{resumed_from}")
    hand_steps = run.dir / "hand_steps"
    hand_steps.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                           "-m", "tests.elastic_worker", *run.trainer_args(), "--set", f"output.dir={by_hand}",
                           "--resume"], cwd=ROOT, env=run.env(DS_FACE_TEST_LEDGER=str(hand_steps)),
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    by_hand_kept = kept_steps(read_steps(hand_steps))
    after = [s for s in sorted(kept) if s > resumed_from]
    assert sorted(by_hand_kept) == after
    assert [kept[s][0]["loss"] for s in after] == [by_hand_kept[s][0]["loss"] for s in after]
    assert [kept[s][0]["lr"] for s in after] == [by_hand_kept[s][0]["lr"] for s in after]


# -- node join ----------------------------------------------------------------------------------------------

def test_node_join_a_second_agent_mid_run_grows_the_world_at_the_next_rendezvous(run):
    first = run.agent("127.0.0.1")
    run.wait_step(4, 1, first)
    run.agent("127.0.0.2")
    run.wait_step(1, 2, first)
    assert run.finish(first) == 0, run.logs()
    assert run.agents[1].wait(timeout=60) == 0, run.logs()

    records = run.records()
    worlds = [world for world, _ in rounds(records)]
    assert worlds == [1, 2], rounds(records)
    grown_at = rounds(records)[1][1] - 1
    assert grown_at in saved_steps(run.out)
    check_every_sample_once(kept_steps(records))
    assert (run.out / "training.log").read_text().count("recovery: world size 1 -> 2") == 1


# -- 2 -> 1 -> 2 -> 1, the second loss during a checkpoint save -----------------------------------------------

def test_node_loss_node_join_then_a_loss_during_a_save_2_1_2_1_latest_always_resumes(run):
    first = run.agent("127.0.0.1")
    second = run.agent("127.0.0.2")
    run.wait_step(4, 2, first)
    lost_at = kill_node(second)
    run.wait_step(1, 1, first, after=lost_at)  # 2 -> 1
    joined_at = time.time()
    second = run.agent("127.0.0.2")
    run.wait_step(1, 2, first, after=joined_at)  # 1 -> 2
    staging = run.out / "checkpoints" / ".saving"
    deadline = time.monotonic() + DEADLINE_S
    while not (staging.is_dir() and any(staging.iterdir())):  # a save in progress: DeepSpeed's files arriving
        assert first.poll() is None and time.monotonic() < deadline, run.logs()
        time.sleep(0.005)
    kill_node(second)  # 2 -> 1, mid-save
    assert run.finish(first) == 0, run.logs()

    records = run.records()
    assert [world for world, _ in rounds(records)] == [2, 1, 2, 1], rounds(records)
    saved = saved_steps(run.out)
    for world, first_step in rounds(records)[1:]:
        assert first_step - 1 in saved, (first_step, sorted(saved))  # each restart resumed a complete checkpoint
    check_every_sample_once(kept_steps(records))
    log = (run.out / "training.log").read_text()
    # one line per recovery, from the world size of the round that failed (last_step.json) to the new one; the
    # loss mid-save resumed a checkpoint of the 1-rank round, which the line also says
    recoveries = [line.split("recovery: world size ")[1][:6] for line in log.splitlines()
                  if "recovery: world size" in line]
    assert recoveries == ["2 -> 1", "1 -> 2", "2 -> 1"], log
    assert (run.out / "checkpoints" / "latest").read_text().strip() == "step_20"


# -- launch.sh --elastic: refusals before anything starts; a real launch over ssh -------------------------------

def launch_sh(tmp_path, *args, hostfile="127.0.0.1 slots=1\n127.0.0.2 slots=1\n", env=None, timeout=60):
    (tmp_path / "hostfile").write_text(hostfile)
    environ = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})}
    return subprocess.run([str(ROOT / "launch.sh"), str(ROOT / "configs/cpu_demo.yaml"),
                           str(ROOT / "ds_configs/cpu_zero2_fp32.json"), *args,
                           "--set", f"output.dir={tmp_path / 'run'}"], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=timeout)


REFUSED = [  # (launch.sh arguments, hostfile or None, the one line)
    (["--elastic", "2:1"], None, "--elastic 2:1: MIN (2) is larger than MAX (1)"),
    (["--elastic", "0:2"], None, "--elastic 0:2: MIN is 0; a run needs at least 1 node"),
    (["--elastic", "3:4"], None, "hostfile: 2 host(s), fewer than MIN = 3 of --elastic 3:4; the run could never start"),
    (["--elastic", "1:1"], None, "hostfile: 2 hosts, more than MAX = 1 of --elastic 1:1"),
    (["--elastic", "1:2"], "127.0.0.1 slots=2\n127.0.0.2 slots=1\n", "hostfile: mixed slot counts ('127.0.0.1 slots=2, "
                                                                     "127.0.0.2 slots=1')"),
    (["--elastic", "1;touch pwned"], None, "--elastic '1;touch pwned': expected MIN:MAX"),
    (["--elastic", "1:2", "--rdzv-port", "$(touch pwned)"], None, "--rdzv-port '$(touch pwned)' is not a TCP port"),
    (["--elastic", "1:2", "--rdzv-id", "x;touch pwned"], None, "--rdzv-id 'x;touch pwned': expected 1 to 64 letters"),
    (["--elastic", "1:2", "--max-restarts", "-1"], None, "--max-restarts '-1' is not an integer from 0 to 1000"),
    (["--elastic", "1:2", "--master_port", "5"], None, "'--master_port': not an option of launch.sh --elastic"),
    (["--elastic", "1:2", "--ssh_port", "0"], None, "--ssh_port '0' is not a TCP port"),
    (["--elastic", "1:2"], "127.0.0.1;touch${IFS}pwned slots=1\n", "host '127.0.0.1;touch${IFS}pwned' is not a host"),
]


@pytest.mark.parametrize("args, hostfile, expect", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_launch_sh_elastic_refuses_before_anything_starts(tmp_path, args, hostfile, expect):
    proc = launch_sh(tmp_path, "--hostfile", str(tmp_path / "hostfile"), *args,
                     **({"hostfile": hostfile} if hostfile else {}))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch.sh: error: ") and expect in lines[0], proc.stderr
    assert not (tmp_path / "run").exists() and not list(tmp_path.rglob("pwned*"))


def test_launch_sh_elastic_refuses_a_busy_rendezvous_port_and_a_missing_hostfile(tmp_path):
    import socket
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = launch_sh(tmp_path, "--hostfile", str(tmp_path / "hostfile"), "--elastic", "1:2",
                         "--rdzv-port", str(port))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"launch.sh: error: --rdzv-port {port} is already in use on 127.0.0.1 (this machine), where the rendezvous "
        f"store must listen (another run?); choose another --rdzv-port"), proc.stderr
    proc = launch_sh(tmp_path, "--elastic", "1:2")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "launch.sh: error: --elastic needs --hostfile: the hosts an elastic run may use"), proc.stderr


def test_launch_sh_elastic_refuses_another_runs_checkpoints_and_names_the_way_on(tmp_path):
    """Checkpoints of another elastic run in output.dir: refused before any agent starts (its workers would
    refuse them at every restart); with that run's --rdzv-id the launch would go on as that run."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_3")
    (tmp_path / "run" / "elastic_run").write_text("other_run\n")
    proc = launch_sh(tmp_path, "--hostfile", str(tmp_path / "hostfile"), "--elastic", "1:2")
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"launch.sh: error: {tmp_path / 'run' / 'checkpoints'} already holds checkpoints "
                               f"(elastic run other_run, not this launch's ") and \
        lines[0].endswith("(or launch with --rdzv-id other_run to go on as that elastic run)"), lines[0]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints", "elastic_run"]


def test_a_failure_past_max_restarts_ends_the_launch_with_one_line_naming_the_run(tmp_path):
    """One host (run here, no ssh), a failure that recurs at every worker start (``--resume`` of a `latest`
    that is a directory: the trainer refuses it, exit 2), --max-restarts 1: two starts, then one closing line."""
    run = Run(tmp_path)
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=1\n")
    run.out.mkdir()
    (run.out / "checkpoints").mkdir()
    (run.out / "checkpoints" / "latest").mkdir()
    environ = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(ROOT / "launch.sh"), str(tmp_path / "run.yaml"), str(tmp_path / "ds.json"),
                           "--elastic", "1", "--hostfile", str(tmp_path / "hostfile"), "--rdzv-port", str(run.port),
                           "--rdzv-id", "maxrestarts", "--max-restarts", "1", "--resume"], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.count("ds_face.train: error:") == 2, proc.stderr[-3000:]  # the first start, one restart
    assert "ChildFailedError" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(
        "ds_face.launch.elastic: run maxrestarts stopped, no agent finished it (exit status 1): "), proc.stderr[-2000:]


SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").is_file() else None)
MISSING = [name for name, path in (("sshd", SSHD), ("ssh", shutil.which("ssh")),
                                   ("ssh-keygen", shutil.which("ssh-keygen"))) if not path]


@pytest.fixture
def loopback_ssh(tmp_path):
    """A private sshd on 127.0.0.1 and 127.0.0.2 (keys made here, ~/.ssh untouched); yields a bin directory whose
    ``ssh`` uses it (put it first on PATH)."""
    if MISSING:
        pytest.skip(f"{', '.join(MISSING)} not installed (Debian: apt-get install -y openssh-server "
                    f"openssh-client, or make multinode-tools)")
    d = tmp_path / "ssh"
    d.mkdir()
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n"
        f"X11Forwarding no\nAllowTcpForwarding no\nLogLevel ERROR\n")
    (d / "ssh_config").write_text(
        f"Host 127.0.0.1 127.0.0.2\n    Port {port}\n    IdentityFile {d}/user_key\n    IdentitiesOnly yes\n"
        f"    UserKnownHostsFile {d}/known_hosts\n    StrictHostKeyChecking no\n    BatchMode yes\n    LogLevel ERROR\n")
    (d / "bin").mkdir()
    (d / "bin" / "ssh").write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {d}/ssh_config "$@"\n')
    (d / "bin" / "ssh").chmod(0o755)
    os.makedirs("/run/sshd", exist_ok=True) if os.access("/run", os.W_OK) else None
    sshd = subprocess.Popen([SSHD, "-D", "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")])
    try:
        deadline = time.monotonic() + 30
        while not all(subprocess.run([str(d / "bin" / "ssh"), host, "true"], capture_output=True).returncode == 0
                      for host in ("127.0.0.1", "127.0.0.2")):
            assert sshd.poll() is None and time.monotonic() < deadline, (d / "sshd.log").read_text()
            time.sleep(0.2)
        yield d / "bin"
    finally:
        sshd.terminate()
        sshd.wait(timeout=30)


def test_node_loss_through_launch_sh_elastic_over_ssh(tmp_path, loopback_ssh):
    """launch.sh --elastic 1:2 over real ssh to two loopback "hosts"; node 2 (its ssh session's guard, agent and
    worker) SIGKILLed mid-run: node 1 finishes the run alone, and the launch exits 0."""
    run = Run(tmp_path)
    run_id = "sshtest" + str(run.port)
    (tmp_path / "hostfile").write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    environ = {**os.environ, "PATH": f"{loopback_ssh}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               "OMP_NUM_THREADS": "1", "DS_FACE_TIMEOUT_MIN": "3"}
    with open(tmp_path / "launch.log", "w") as log:
        launch = subprocess.Popen([str(ROOT / "launch.sh"), str(tmp_path / "run.yaml"), str(tmp_path / "ds.json"),
                                   "--elastic", "1:2", "--hostfile", str(tmp_path / "hostfile"), "--rdzv-port",
                                   str(run.port), "--rdzv-id", run_id], cwd=ROOT, env=environ, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def node2():  # the agent started for 127.0.0.2, and the --node guard above it
            for p in psutil.process_iter(["cmdline"]):
                cmd = p.info["cmdline"] or []
                if "torch.distributed.run" in cmd and run_id in cmd and "127.0.0.2" in cmd:
                    return p
        deadline = time.monotonic() + DEADLINE_S
        while "world size 2" not in ((run.out / "training.log").read_text() if (run.out / "training.log").exists()
                                     else "") or "Global Step: 5/" not in (run.out / "training.log").read_text():
            assert launch.poll() is None and time.monotonic() < deadline, run.logs()
            time.sleep(0.1)
        agent = node2()
        victims = [agent.parent(), agent, *agent.children(recursive=True)]
        for p in victims:
            p.kill()
        assert launch.wait(timeout=DEADLINE_S) == 0, run.logs()
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGTERM)
            launch.wait(timeout=120)
    log = (run.out / "training.log").read_text()
    assert log.count("recovery: world size 2 -> 1") == 1 and "done: 20 optimizer steps" in log, log[-3000:]
    assert (run.out / "elastic_run").read_text().strip() == run_id  # DS_FACE_ELASTIC_RUN reached the workers
    launched = (tmp_path / "launch.log").read_text()
    assert f"ds_face.launch.elastic: run {run_id}: 1 to 2 node(s) x 1 rank(s), rendezvous at 127.0.0.1:" in launched
