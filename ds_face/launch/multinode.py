"""ds_face's multi-node launcher: what ``launch.sh --hostfile`` runs in place of DeepSpeed's pdsh runner.

    python -m ds_face.launch.multinode --hostfile FILE [runner options] -- TRAINER ARGS...

It starts ``deepspeed.launcher.launch`` (DeepSpeed's per-node launcher, unchanged) on every host of the
hostfile with the same ``--world_info`` DeepSpeed's runner computes, then ``ds_face.train`` with TRAINER ARGS.
What differs from DeepSpeed's runner, by construction rather than by a list of checks:

* **Quoted.** Every node's command line is built from an argv list and an environment dict, each token
  ``shlex.quote``-d (``remote_command``): paths, arguments and environment values reach the node verbatim,
  whatever characters they hold (spaces, quotes, ``$``, ``;``, newlines, unicode). Values that are not quoted
  data but must be of one kind are allow-listed: host names (``ds_face.launch.hostfile``), the master address,
  ports, environment variable names (``ds_face.launch.preflight``); anything else stops the launch naming it. The
  nodes' login shell must be a POSIX shell (sh, bash, dash, zsh, ksh), as for DeepSpeed's runner.
* **Tied to this launcher.** One ``ssh`` per host (the transport pdsh uses), its stdin a pipe held only by
  this process. On each node the command runs under ``python -m ds_face.launch.multinode --node``, which starts it in
  a new session and stops that session (SIGTERM to the node launcher, then SIGKILL to what is left) when its
  stdin reaches EOF: when this launcher stops it, exits or dies (even ``kill -9``), or ssh is cut. A stop
  (SIGTERM, SIGINT, SIGHUP) therefore ends exactly this launch's processes on every node and never another
  run's, even one from the same venv (no ``pkill`` by command line). When one host's launch fails (a rank
  died), the other hosts get FAILED_HOST_GRACE_S to stop by themselves (their ranks say why), then are stopped.

Runner options (DeepSpeed's spelling): -H/--hostfile, -i/--include, -e/--exclude, --num_nodes,
--num_gpus/--num_accelerators, --master_addr (default: the first host's ``hostname -I``, or 127.0.0.1 for a
one-host launch), --master_port, --launcher pdsh|ssh (both: one ssh per host), --ssh_port, --venv_script,
--enable_each_rank_log, --force_multi (a one-host file still goes over ssh), --no_ssh_check, --log_level,
-q/--quiet. Any other option (--launcher openmpi/mvapich/slurm/mpich/impi, --launcher_args, --no_ssh,
--save_pid, --bind_cores_to_rank, ...) is refused, naming it. Environment: DS_FACE_*, HF_*, OMP_NUM_THREADS,
GLOO_*, TORCH_NCCL_*, TORCH_DISTRIBUTED_DEBUG, TORCH_CPP_LOG_LEVEL and what DeepSpeed's runner exports
(NCCL*, PYTHON*, MV2*, UCX*, MLFLOW*) go from this shell to every node, then the KEY=VALUE lines of
~/.deepspeed_env and ./.deepspeed_env (the file name: $DS_ENV_FILE), with PYTHONPATH led by this directory.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

from ds_face.launch.hostfile import HostfileError, parse_hostfile, select_slots, shown
from ds_face.launch.preflight import address_problem, env_name_problem, port_problem

FORWARDED = re.compile(r"(DS_FACE_|HF_|GLOO_|TORCH_NCCL_|NCCL|PYTHON|MV2|UCX|MLFLOW)\w*|OMP_NUM_THREADS|"
                       r"TORCH_DISTRIBUTED_DEBUG|TORCH_CPP_LOG_LEVEL")
SUPPORTED_LAUNCHERS = ("pdsh", "ssh")
MAX_COMMAND = 100_000  # bytes: Linux takes at most 128 KiB in one argument, the string a node's shell gets
NODE_STOP_S = 45  # a node's launcher gets this long to stop its ranks (DeepSpeed's launch.py waits 30 s)
FAILED_HOST_GRACE_S = 30  # after one host's launch failed, the others' ranks notice within seconds
SSH = ["ssh", "-T", "-x", "-a", "-o", "BatchMode=yes"]  # no tty/X11/agent; never ask for a password


class LaunchError(ValueError):
    pass


# -- the command line a node's shell runs -------------------------------------------------------------------

def remote_command(argv: list[str], cwd: str, env: dict[str, str], source: str | None = None) -> str:
    """One POSIX shell command line that sources ``source`` (if any), exports ``env``, enters ``cwd`` and
    executes ``argv``, every value quoted: the node's shell sees each as one word, verbatim."""
    for name in env:
        problem = env_name_problem(name)
        if problem:
            raise LaunchError(f"environment variable {problem}")
    parts = [f". {shlex.quote(source)}"] if source else []
    if env:
        parts.append("export " + " ".join(f"{name}={shlex.quote(value)}" for name, value in env.items()))
    parts.append(f"cd {shlex.quote(cwd)}")
    parts.append("exec " + " ".join(map(shlex.quote, argv)))
    command = " && ".join(parts)  # a failed source or cd stops there, with the shell's own message
    size = len(command.encode("utf-8", "surrogateescape"))
    if size > MAX_COMMAND:
        longest = max([*argv, *env.values(), cwd, source or ""], key=len)
        raise LaunchError(f"the command for each node would be {size} bytes (at most {MAX_COMMAND}); the longest "
                          f"value: {shown(longest)}")
    return command


def node_argv(argv: list[str]) -> list[str]:
    """``argv`` as run on a node: under this module's --node guard, which stops it when the launcher goes."""
    return [sys.executable, "-u", "-m", "ds_face.launch.multinode", "--node", "--", *argv]


# -- running one argv per host, tied to this process ---------------------------------------------------------

class _Host:
    """One host's ssh (or, for a launch on this machine alone, the guard itself) and its output relay."""

    def __init__(self, host: str, cmd: list[str], lock: threading.Lock, **popen):
        self.host = host
        # Its own session: a Ctrl-C or a signal to our process group reaches only this process, which then
        # stops the nodes and waits for them (a killed ssh would leave us nothing to wait on).
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True, **popen)
        self.relays = [threading.Thread(target=self._relay, args=(src, dst, lock), daemon=True) for src, dst in
                       ((self.proc.stdout, sys.stdout.buffer), (self.proc.stderr, sys.stderr.buffer))]
        for relay in self.relays:
            relay.start()

    def _relay(self, src, dst, lock):
        prefix = f"{self.host}: ".encode()
        for line in iter(src.readline, b""):  # line by line, each prefixed with its host, as pdsh does
            with lock:
                try:
                    dst.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
                    dst.flush()
                except OSError:  # our own output closed: keep draining, so the node never blocks on it
                    pass

    def release(self):
        """EOF on the node's guard's stdin: it stops its command (the way to stop a host)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass


def run_on_hosts(commands: dict[str, list[str]], cwd: str, env: dict[str, str], *, ssh_port: int | None = None,
                 source: str | None = None, local: bool = False,
                 failed_host_grace: float | None = FAILED_HOST_GRACE_S, outcome=max) -> int:
    """Run ``commands[host]`` (an argv) on each host over ssh, quoted by construction (``remote_command``),
    under the --node guard; relay output as ``HOST: line``; return ``outcome`` of the hosts' exit statuses
    (128+N for a signal): by default the highest. SIGTERM/SIGINT/SIGHUP here, or this process's death, stop
    every host's command and only them. ``failed_host_grace``: once one host's command failed, the others are
    stopped after that many seconds; None: they run on (torch's elastic agents carry on without a lost node).
    ``local``: one host, run here without ssh or a shell (``env`` added to this environment)."""
    lock = threading.Lock()
    shell_lines = {host: remote_command(node_argv(argv), cwd, env, source) for host, argv in commands.items()}
    stop = threading.Event()
    signalled = []

    def on_signal(signum, frame):
        signalled.append(signum)
        stop.set()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    if local and source:
        raise LaunchError("--venv_script needs a launch over ssh (two hosts or more, or --force_multi)")
    print(f"ds_face.launch.multinode: {len(commands)} host(s): {', '.join(commands)} "
          f"({'here, no ssh' if local else 'one ssh each'}); exporting {' '.join(env)}", file=sys.stderr, flush=True)
    hosts, start_error = [], None
    try:
        for host, argv in commands.items():
            if local:
                hosts.append(_Host(host, node_argv(argv), lock, cwd=cwd, env={**os.environ, **env}))
            else:
                port = ["-p", str(ssh_port)] if ssh_port else []
                hosts.append(_Host(host, [*SSH, *port, "--", host, shell_lines[host]], lock))
    except OSError as err:  # e.g. no ssh on PATH: stop the hosts already started, then say so
        start_error = f"cannot start {'python' if local else 'ssh'} for {host}: {err.strerror}"
        stop.set()

    failed_at = stop_at = None
    while any(h.proc.poll() is None for h in hosts):
        if failed_at is None and any(h.proc.returncode for h in hosts):
            failed_at = time.monotonic()
        if stop_at is None and (stop.is_set() or (failed_at and failed_host_grace is not None
                                                  and time.monotonic() - failed_at > failed_host_grace)):
            stop_at = time.monotonic()
            for h in hosts:
                h.release()
        if stop_at and time.monotonic() - stop_at > NODE_STOP_S:
            for h in hosts:  # ssh cut: the node's sshd closes the guard's stdin all the same
                if h.proc.poll() is None:
                    h.proc.kill()
        stop.wait(0.2)
    for h in hosts:
        for relay in h.relays:
            relay.join(timeout=5)
        if h.proc.returncode == 255 and not local:
            print(f"ds_face.launch.multinode: {h.host}: ssh exited 255 (unreachable, no passwordless ssh, or the "
                  f"connection was cut)", file=sys.stderr, flush=True)
    if start_error:
        raise LaunchError(start_error)
    if signalled:
        return 128 + signalled[0]
    return outcome([rc if rc >= 0 else 128 - rc for rc in (h.proc.returncode for h in hosts)])


# -- the guard on each node ----------------------------------------------------------------------------------

def node_main(argv: list[str]) -> int:
    """Run ``argv`` in a new session; stop that session when stdin reaches EOF or on SIGTERM/SIGINT/SIGHUP:
    SIGTERM to ``argv``'s process (DeepSpeed's launch.py stops its ranks on it), SIGKILL to the session's
    process group after NODE_STOP_S, and to whatever of the group is left when ``argv`` exits."""
    try:
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as err:
        print(f"ds_face.launch.multinode: cannot run {shown(argv[0] if argv else '')}: {err.strerror}", file=sys.stderr)
        return 127
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())

    def watch_stdin():
        while os.read(0, 65536):
            pass
        stop.set()
    threading.Thread(target=watch_stdin, daemon=True).start()
    stop_at = None
    # WNOWAIT: the child stays a zombie until the group is killed, so its pid (the group id) cannot be reused
    while os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if stop.is_set() and stop_at is None:
            stop_at = time.monotonic()
            child.terminate()
        if stop_at and time.monotonic() - stop_at > NODE_STOP_S:
            os.killpg(child.pid, signal.SIGKILL)
        stop.wait(0.2)
    try:
        os.killpg(child.pid, signal.SIGKILL)  # ranks or workers the node launcher left behind
    except ProcessLookupError:
        pass
    return child.wait()


# -- the launch: options, hosts, environment ----------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise LaunchError(message)


def parse_options(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="launch.sh", add_help=False, allow_abbrev=False)
    parser.add_argument("-H", "--hostfile", required=True)
    parser.add_argument("-i", "--include", default="")
    parser.add_argument("-e", "--exclude", default="")
    parser.add_argument("--num_nodes", default="-1")
    parser.add_argument("--num_gpus", "--num_accelerators", default="-1")
    parser.add_argument("--master_addr", default="")
    parser.add_argument("--master_port", default="29500")
    parser.add_argument("--launcher", default="pdsh")
    parser.add_argument("--ssh_port", default=None)
    parser.add_argument("--venv_script", default=None)
    parser.add_argument("--enable_each_rank_log", default=None)
    parser.add_argument("--force_multi", action="store_true")
    parser.add_argument("--no_ssh_check", action="store_true")  # nothing to skip: ssh errors come with the launch
    parser.add_argument("--log_level", default=None, choices=["debug", "info", "warning", "error", "critical"])
    parser.add_argument("-q", "--quiet", action="store_true")
    opts, unknown = parser.parse_known_args(argv)
    if unknown:
        raise LaunchError(f"{shown(unknown[0])}: not an option of launch.sh's multi-node runner (ds_face.launch.multinode);"
                          f" it takes -H/--hostfile, -i/--include, -e/--exclude, --num_nodes, --num_gpus, "
                          f"--master_addr, --master_port, --launcher pdsh|ssh, --ssh_port, --venv_script, "
                          f"--enable_each_rank_log, --force_multi, --no_ssh_check, --log_level, -q")
    if opts.launcher.lower() not in SUPPORTED_LAUNCHERS:
        raise LaunchError(f"--launcher {shown(opts.launcher)}: a hostfile launch goes through ds_face's ssh runner "
                          f"(ds_face/launch/multinode.py), which takes --launcher pdsh or ssh; openmpi, mvapich, slurm, "
                          f"mpich and impi are not supported by launch.sh (yet)")
    for option in ("master_port", "ssh_port"):
        value = getattr(opts, option)
        if value is not None and port_problem(value):
            raise LaunchError(f"--{option} {port_problem(value)}")
    for option in ("num_nodes", "num_gpus"):
        value = getattr(opts, option)
        if value != "-1" and not (re.fullmatch(r"[0-9]{1,4}", value) and int(value) > 0):
            raise LaunchError(f"--{option} {shown(value)} is not a positive integer")
    if opts.master_addr and address_problem(opts.master_addr):
        raise LaunchError(f"--master_addr {address_problem(opts.master_addr)}")
    for option in ("venv_script", "enable_each_rank_log"):
        if getattr(opts, option) in ("", "None"):  # launch.py reads "None" as off; "" is no path
            raise LaunchError(f"--{option} {shown(getattr(opts, option))}: expected a path")
    return opts


def read_env_file(path: str) -> dict[str, str]:
    """A .deepspeed_env file's KEY=VALUE lines (blank lines and '#' comments skipped), each VALUE verbatim."""
    from ds_face.config.bounded import read_at_most
    try:  # bounded; a fifo is refused (NotARegularFile), not waited on
        data = read_at_most(path, MAX_COMMAND)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LaunchError(f"{path}: cannot read ({err})") from None
    if len(data) > MAX_COMMAND:
        raise LaunchError(f"{path}: larger than {MAX_COMMAND} bytes")
    env = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        problem = env_name_problem(name) if sep else f"{shown(line)} is not KEY=VALUE"
        if problem:
            raise LaunchError(f"{path} line {number}: {problem}")
        env[name] = value
    return env


def node_environment(environ: dict[str, str], cwd: str) -> dict[str, str]:
    """What every node's launch gets exported: the forwarded variables of ``environ``, then the lines of
    ~/.deepspeed_env and ./.deepspeed_env ($DS_ENV_FILE), PYTHONPATH led by ``cwd`` (as DeepSpeed's runner)."""
    env = {}
    for name, value in sorted(environ.items()):
        if FORWARDED.match(name):
            problem = env_name_problem(name)
            if problem:
                raise LaunchError(f"environment variable {problem} (it would be forwarded to the nodes)")
            env[name] = value
    file_name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    seen = set()
    for folder in (os.path.expanduser("~"), cwd):
        path = os.path.join(folder, file_name)
        if os.path.isfile(path) and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            env.update(read_env_file(path))
    env["PYTHONPATH"] = cwd + (":" + environ["PYTHONPATH"] if environ.get("PYTHONPATH") else "")
    return env


def first_host_address(host: str, ssh_port: str | None) -> str:
    """The first address ``hostname -I`` prints on ``host`` (DeepSpeed's default master address)."""
    port = ["-p", ssh_port] if ssh_port else []
    proc = subprocess.run([*SSH, *port, "--", host, "hostname -I"], capture_output=True, text=True, timeout=60)
    words = proc.stdout.split()
    if proc.returncode != 0 or not words or address_problem(words[0]):
        raise LaunchError(f"no --master_addr given and 'ssh {host} hostname -I' gave no address "
                          f"(exit {proc.returncode}: {shown((proc.stderr or proc.stdout).strip())}); "
                          f"give --master_addr")
    return words[0]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if argv[:1] == ["--node"]:  # on a node, started by run_on_hosts: the guard
        return node_main(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    split = argv.index("--") if "--" in argv else len(argv)
    trainer_args = argv[split + 1:]
    try:
        opts = parse_options(argv[:split])
        hosts = parse_hostfile(opts.hostfile)
        active = select_slots(hosts, opts.include, opts.exclude, int(opts.num_nodes), int(opts.num_gpus))
        cwd = os.getcwd()
        env = node_environment(dict(os.environ), cwd)
        local = len(active) == 1 and not opts.force_multi  # as DeepSpeed's runner: one host runs here
        master_addr = opts.master_addr or ("127.0.0.1" if local else first_host_address(next(iter(active)),
                                                                                          opts.ssh_port))
        world_info = base64.urlsafe_b64encode(json.dumps(active).encode()).decode()
        launch = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}"]
        options = [f"--master_addr={master_addr}", f"--master_port={opts.master_port}"]
        if opts.enable_each_rank_log:
            options.append(f"--enable_each_rank_log={opts.enable_each_rank_log}")
        if opts.log_level:
            options.append(f"--log_level={opts.log_level}")
        if opts.quiet:
            options.append("--quiet")
        commands = {host: [*launch, f"--node_rank={rank}", *options, "--module", "ds_face.train", *trainer_args]
                    for rank, host in enumerate(active)}
        return run_on_hosts(commands, cwd, env, ssh_port=opts.ssh_port and int(opts.ssh_port),
                            source=opts.venv_script, local=local)
    except (LaunchError, HostfileError) as err:
        print(f"launch.sh: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
