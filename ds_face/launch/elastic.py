"""ds_face's elastic launch: what ``launch.sh --elastic MIN:MAX --hostfile FILE`` runs.

    python -m ds_face.launch.elastic --elastic MIN:MAX -H FILE [--max-restarts N] [--rdzv-port P] [--rdzv-id ID]
        [--ssh_port P] [--venv_script FILE] -- TRAINER ARGS...

One torch elastic agent per host of the hostfile (``python -m torch.distributed.run``, i.e. ``torchrun``:
``--nnodes MIN:MAX --nproc-per-node SLOTS --rdzv-backend c10d --rdzv-endpoint FIRST_HOST:PORT``), each running
``ds_face.train`` with TRAINER ARGS. The agents rendezvous at the first host, which hosts the c10d store. When a
node is lost, the survivors' agents restart their workers at the smaller world size (as long as at least MIN
nodes are left, at most ``--max-restarts`` times); a node whose agent is started again, or a spare, joins at
the next rendezvous and the run grows back. Every worker gets ``DS_FACE_ELASTIC_RUN=<run id>`` (a fresh random
id per launch unless ``--rdzv-id`` is given): ``ds_face.train`` then resumes ``latest`` of that run by itself at
every restart.

The agents are started exactly as ``ds_face.launch.multinode`` starts DeepSpeed's node launchers: one ssh per
host, every value quoted by construction, names and numbers allow-listed, each agent under the ``--node`` guard
that stops it when this launcher stops or dies. Unlike that launch, one host's failure does not stop the others:
the agents carry on without it; the launch succeeds when one agent finishes the run (exit 0).
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
import uuid
from pathlib import Path

from ds_face.launch.hostfile import HostfileError, parse_hostfile, shown
from ds_face.launch.multinode import LaunchError, node_environment, run_on_hosts
from ds_face.launch.preflight import port_is_free, port_problem
from ds_face.training.recovery import ELASTIC_ENV as ENV_RUN_ID  # the variable the trainer reads

DEFAULT_RDZV_PORT = 29400  # torchrun's default for --rdzv-endpoint
DEFAULT_MAX_RESTARTS = 3  # each node loss costs every survivor one; a join costs none
# The rendezvous' timing (seconds): a lost node is dropped after keep_alive_interval x keep_alive_max_attempt
# without a heartbeat; once MIN nodes are in, the rendezvous waits last_call_timeout for more. torch's defaults
# (5 x 3, 30) add ~35 s to every recovery; joins (join_timeout, 600 s) keep torch's default.
RDZV_TIMING = "last_call_timeout=5,keep_alive_interval=2,keep_alive_max_attempt=3"
# What every agent's environment gets besides the forwarded variables. torch 2.13's agents by default hand their
# workers a store server of the group-rank-0 agent and publish its address once, at that agent's first
# rendezvous: a node that joins later (the run growing back) then waits for an address that is never published
# and the rendezvous fails after read_timeout (60 s). Without the sharing, each round's rank-0 agent publishes a
# fresh master address and port, and the workers' process group makes its own store there.
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise LaunchError(message)


def parse_options(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="launch.sh --elastic", add_help=False, allow_abbrev=False)
    parser.add_argument("--elastic", required=True)
    parser.add_argument("-H", "--hostfile", required=True)
    parser.add_argument("--max-restarts", default=str(DEFAULT_MAX_RESTARTS))
    parser.add_argument("--rdzv-port", default=str(DEFAULT_RDZV_PORT))
    parser.add_argument("--rdzv-id", default=None)
    parser.add_argument("--ssh_port", default=None)
    parser.add_argument("--venv_script", default=None)
    opts, unknown = parser.parse_known_args(argv)
    if unknown:
        raise LaunchError(f"{shown(unknown[0])}: not an option of launch.sh --elastic (ds_face.launch.elastic); it "
                          f"takes --elastic MIN:MAX, -H/--hostfile, --max-restarts, --rdzv-port, --rdzv-id, "
                          f"--ssh_port, --venv_script")
    match = re.fullmatch(r"([0-9]{1,4})(?::([0-9]{1,4}))?", opts.elastic)
    if not match:
        raise LaunchError(f"--elastic {shown(opts.elastic)}: expected MIN:MAX, the fewest and the most nodes, "
                          f"e.g. 1:2")
    opts.min_nodes = int(match.group(1))
    opts.max_nodes = int(match.group(2) or match.group(1))
    if opts.min_nodes < 1:
        raise LaunchError(f"--elastic {opts.elastic}: MIN is {opts.min_nodes}; a run needs at least 1 node")
    if opts.min_nodes > opts.max_nodes:
        raise LaunchError(f"--elastic {opts.elastic}: MIN ({opts.min_nodes}) is larger than MAX ({opts.max_nodes})")
    if not (re.fullmatch(r"[0-9]{1,4}", opts.max_restarts) and int(opts.max_restarts) <= 1000):
        raise LaunchError(f"--max-restarts {shown(opts.max_restarts)} is not an integer from 0 to 1000")
    for flag, value in (("--rdzv-port", opts.rdzv_port), ("--ssh_port", opts.ssh_port)):
        if value is not None and port_problem(value):
            raise LaunchError(f"{flag} {port_problem(value)}")
    from ds_face.training.recovery import RUN_ID  # the one pattern: the trainer checks DS_FACE_ELASTIC_RUN by it
    if opts.rdzv_id is not None and not RUN_ID.fullmatch(opts.rdzv_id):
        raise LaunchError(f"--rdzv-id {shown(opts.rdzv_id)}: expected 1 to 64 letters, digits, '_', '.' or '-' "
                          f"(starting with a letter or digit)")
    if opts.venv_script in ("", "None"):
        raise LaunchError(f"--venv_script {shown(opts.venv_script)}: expected a path")
    return opts


def check_hosts(hosts: dict[str, int], path: str, min_nodes: int, max_nodes: int) -> int:
    """The slots per node, the same on every host; refuse a hostfile that cannot make an elastic run."""
    if len(hosts) < min_nodes:
        raise LaunchError(f"{path}: {len(hosts)} host(s), fewer than MIN = {min_nodes} of --elastic "
                          f"{min_nodes}:{max_nodes}; the run could never start")
    if len(hosts) > max_nodes:
        raise LaunchError(f"{path}: {len(hosts)} hosts, more than MAX = {max_nodes} of --elastic "
                          f"{min_nodes}:{max_nodes}; list at most {max_nodes} (start a spare's agent later to "
                          f"have it join)")
    counts = sorted(set(hosts.values()))
    if len(counts) > 1:
        listed = ", ".join(f"{host} slots={slots}" for host, slots in hosts.items())
        raise LaunchError(f"{path}: mixed slot counts ({shown(listed, 200)}); an elastic run gives every node the "
                          f"same number of ranks (torchrun --nproc-per-node), so that any MIN..MAX of them make "
                          f"a layout: give every host the same slots")
    return counts[0]


def check_output_dir(trainer_args: list[str], run_id: str) -> None:
    """Refuse now what every worker would refuse at each of its restarts: an output.dir (as seen from here: a
    shared filesystem, as checkpoints need) holding checkpoints of another run, without ``--resume``."""
    from ds_face.config import ConfigError, load_run_config, parse_set_overrides
    from ds_face.launch.preflight import set_pairs
    from ds_face.training.recovery import recorded_run_id, should_resume
    if "--config" not in trainer_args[:-1]:
        raise LaunchError("no '--config RUN.yaml' among the trainer's arguments (after '--'); launch.sh passes it")
    config = trainer_args[trainer_args.index("--config") + 1]
    try:
        output_dir = Path(load_run_config(config, parse_set_overrides(set_pairs(trainer_args))).output.dir)
        should_resume("--resume" in trainer_args, output_dir, os.path.lexists(output_dir / "checkpoints" / "latest"),
                      run_id)
    except ConfigError as err:
        recorded = recorded_run_id(output_dir)
        again = f" (or launch with --rdzv-id {recorded} to go on as that elastic run)" if recorded else ""
        raise LaunchError(f"{err}{again}") from None


def is_this_machine(host: str) -> bool:
    """Whether ``host`` names an address of this machine (a socket can be bound to it)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):
        return False
    for address in addresses:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((address, 0))
                return True
            except OSError:
                pass
    return False


def agent_command(host: str, *, first: str, port: int, slots: int, min_nodes: int, max_nodes: int,
                  max_restarts: int, run_id: str, trainer_args: list[str]) -> list[str]:
    """The torch elastic agent one host runs: the first host hosts the c10d store (is_host), every host
    advertises its hostfile name (--local-addr: what the others reach it by, the master address when its
    node gets group rank 0)."""
    return [sys.executable, "-u", "-m", "torch.distributed.run", "--nnodes", f"{min_nodes}:{max_nodes}",
            "--nproc-per-node", str(slots), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{first}:{port}",
            "--rdzv-id", run_id, "--rdzv-conf", f"is_host={int(host == first)},{RDZV_TIMING}",
            "--local-addr", host, "--max-restarts", str(max_restarts), "-m", "ds_face.train", *trainer_args]


def ending_causes(first: str) -> str:
    """What an elastic run cannot survive, as torch's agents report it."""
    return (f"the rendezvous host {first} was lost (RendezvousConnectionError: The connection to the C10d store "
            f"has failed), fewer than MIN nodes were left for join_timeout (RendezvousTimeoutError), or workers "
            f"failed more than --max-restarts times (ChildFailedError)")


def one_finished(codes: list[int]) -> int:
    """An elastic launch succeeded when one agent finished the run; lost nodes' agents fail on the way."""
    return 0 if 0 in codes else max(codes)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    split = argv.index("--") if "--" in argv else len(argv)
    trainer_args = argv[split + 1:]
    try:
        opts = parse_options(argv[:split])
        hosts = parse_hostfile(opts.hostfile)
        slots = check_hosts(hosts, opts.hostfile, opts.min_nodes, opts.max_nodes)
        first, port = next(iter(hosts)), int(opts.rdzv_port)
        # the c10d store listens on the first host: a busy port there is found now, not by every agent later
        if is_this_machine(first) and not port_is_free(port):
            raise LaunchError(f"--rdzv-port {port} is already in use on {first} (this machine), where the "
                              f"rendezvous store must listen (another run?); choose another --rdzv-port")
        run_id = opts.rdzv_id or uuid.uuid4().hex
        check_output_dir(trainer_args, run_id)
        cwd = os.getcwd()
        env = {**node_environment(dict(os.environ), cwd), **AGENT_ENV, ENV_RUN_ID: run_id}
        commands = {host: agent_command(host, first=first, port=port, slots=slots, min_nodes=opts.min_nodes,
                                        max_nodes=opts.max_nodes, max_restarts=int(opts.max_restarts),
                                        run_id=run_id, trainer_args=trainer_args) for host in hosts}
        print(f"ds_face.launch.elastic: run {run_id}: {opts.min_nodes} to {opts.max_nodes} node(s) x {slots} "
              f"rank(s), rendezvous at {first}:{port}, at most {opts.max_restarts} restart(s)",
              file=sys.stderr, flush=True)
        status = run_on_hosts(commands, cwd, env, ssh_port=opts.ssh_port and int(opts.ssh_port),
                              source=opts.venv_script, local=len(hosts) == 1, failed_host_grace=None,
                              outcome=one_finished)
        if status not in (0, 128 + signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGHUP):
            print(f"ds_face.launch.elastic: run {run_id} stopped, no agent finished it (exit status {status}): "
                  f"{ending_causes(first)}; each agent's last lines above name which. Its checkpoints resume: "
                  f"launch again with --rdzv-id {run_id} (or pass --resume)", file=sys.stderr, flush=True)
        return status
    except (LaunchError, HostfileError) as err:
        print(f"launch.sh: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
