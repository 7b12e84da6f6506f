"""Checks ``launch.sh`` runs before DeepSpeed starts any rank, so that a bad launch fails in a second with one
clear message instead of on every node after start-up.

    python -m ds_face.preflight RUN.yaml DS.json [--port N [--port-given]]
                                [--remote [--env-file F ...] [--forward NAME ...]] -- ARGS...

* **Both config files** (``ARGS`` holds the trainer's ``--set`` pairs): everything ``ds_face.config`` checks
  without the world size, ``output.dir`` included.
* **The precision against this machine** (single-node launches): an fp16 or bf16 DeepSpeed JSON is checked
  with DeepSpeed's own probe, ``get_accelerator().is_fp16_supported()`` / ``is_bf16_supported()`` (what the
  engine's sanity check asks after every rank has started, in ``deepspeed.initialize``). Importing DeepSpeed's
  accelerator costs torch + DeepSpeed's imports (~1.5 s warm on 2 cores), so fp32 configs skip it. Launches
  with a hostfile skip it too: the launching node need not be one of the nodes that run ranks.
* **The master port** (single-node launches): ``--port N --port-given`` (the user's ``--master_port``) must be
  free, or the launch stops naming it; without ``--port-given`` a busy default is replaced by a free port,
  printed on stdout and stated on stderr.
* **Values sent to remote shells** (``--remote``: a launch with a hostfile). DeepSpeed 0.19.8's pdsh runner
  builds one shell command line that every node runs: ``export KEY=VALUE; ... cd DIR; python -m
  deepspeed.launcher.launch ... ARGS``. It wraps an environment value in double quotes when it holds a
  character outside ``[A-Za-z0-9_@%+=:,./-]`` (escaping nothing), and a trainer argument in double quotes
  only when it holds a space (escaping only ``"``); any other argument goes in bare. So ``$(...)``, backticks
  and ``\\`` in a value, or ``;``, ``|``, ``*``, ``[`` in an argument without a space, would be run or
  expanded by the shell on every node. Such values are refused here, naming them; everything accepted
  arrives verbatim.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import sys

# What DeepSpeed's runner sends unquoted (MultiNodeRunner.add_export's regex): the shell leaves it as it is.
BARE = re.compile(r"^[\w@%+=:,./-]*$")
# Still active inside the double quotes the runner adds: parameter/command substitution and escapes.
ACTIVE_IN_DOUBLE_QUOTES = ("$", "`", "\\")
# Variables DeepSpeed's runner exports to the nodes from its own environment (runner.EXPORT_ENVS, NCCL too).
RUNNER_EXPORTS = ("NCCL", "PYTHON", "MV2", "UCX", "MLFLOW")
DEFAULT_MASTER_PORT = 29500  # deepspeed.constants.TORCH_DISTRIBUTED_DEFAULT_PORT


class PreflightError(ValueError):
    pass


def remote_argument_problem(arg: str) -> str | None:
    """Why ``arg`` would not reach the remote ranks verbatim through DeepSpeed's pdsh command line, or None."""
    if "\n" in arg or "\r" in arg:
        return "it holds a line break"
    if " " not in arg:  # sent bare: only characters the shell leaves alone
        if BARE.match(arg):
            return None
        bad = sorted({c for c in arg if not BARE.match(c)})
        return (f"without a space it reaches the remote shell unquoted, where {' '.join(bad)} would be "
                f"interpreted; use only letters, digits and _@%+=:,./- (a YAML list can be written with "
                f"spaces, e.g. 'head.margin=[1.0, 0.5, 0.0]', which DeepSpeed then quotes)")
    bad = [c for c in ACTIVE_IN_DOUBLE_QUOTES if c in arg]
    if bad:
        return f"DeepSpeed puts it in double quotes, where {' '.join(bad)} would still be interpreted"
    return None


def remote_env_problem(value: str) -> str | None:
    """Why an exported environment value would not reach the nodes verbatim, or None."""
    if "\n" in value or "\r" in value:
        return "it holds a line break"
    if value != value.strip():
        return "DeepSpeed strips its leading/trailing whitespace"
    if BARE.match(value):
        return None
    bad = [c for c in ACTIVE_IN_DOUBLE_QUOTES + ('"',) if c in value]
    if bad:
        return (f"DeepSpeed puts it in double quotes without escaping, where {' '.join(bad)} would be "
                f"interpreted by every node's shell")
    return None


def check_remote_values(args: list[str], env_lines: list[tuple[str, str]], environ: dict) -> None:
    """Raise PreflightError naming every argument and variable that would not arrive verbatim.

    ``env_lines``: (where, "KEY=VALUE") from the DS_ENV_FILE the runner will read; ``environ``: this
    process's environment, from which the runner exports the RUNNER_EXPORTS variables itself."""
    problems = []
    for arg in args:
        problem = remote_argument_problem(arg)
        if problem:
            problems.append(f"trainer argument {arg!r}: {problem}")
    for where, line in env_lines:
        key, sep, value = line.partition("=")
        if not sep:
            problems.append(f"{where}: {line!r} is not KEY=VALUE")
            continue
        problem = remote_env_problem(value)
        if problem:
            problems.append(f"{key.strip()}={value!r} ({where}): {problem}")
    for key, value in sorted(environ.items()):
        if key.startswith(RUNNER_EXPORTS):
            problem = remote_env_problem(value)
            if problem:
                problems.append(f"{key}={value!r} (environment, exported by DeepSpeed's runner): {problem}")
    if problems:
        raise PreflightError("values that would not reach the other nodes verbatim (DeepSpeed's pdsh runner "
                             "passes them through a remote shell); nothing was started:\n  " + "\n  ".join(problems))


def read_env_file(path: str) -> list[tuple[str, str]]:
    with open(path) as f:
        return [(path, line.rstrip("\n")) for line in f if line.strip() and not line.lstrip().startswith("#")]


def enabled_precisions(ds_config: dict) -> list[str]:
    """The reduced precisions the DeepSpeed config turns on: [], ["fp16"] or ["bf16"] ("bfloat16" is bf16)."""
    def on(section) -> bool:
        return isinstance(section, dict) and section.get("enabled") is True
    found = ["fp16"] if on(ds_config.get("fp16")) else []
    if on(ds_config.get("bf16")) or on(ds_config.get("bfloat16")):
        found.append("bf16")
    return found


def check_precision(ds_config: dict, path: str) -> None:
    """Refuse an fp16/bf16 config that this machine's DeepSpeed accelerator cannot run, as the engine would
    (``Type fp16 is not supported on your device``), but before any rank starts."""
    wanted = enabled_precisions(ds_config)
    if not wanted:
        return  # fp32: nothing to ask, and no torch/DeepSpeed import
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed logs its accelerator choice on stdout
        from deepspeed.accelerator import get_accelerator
        accelerator = get_accelerator()
        supported = {"fp16": accelerator.is_fp16_supported(), "bf16": accelerator.is_bf16_supported()}
    for precision in wanted:
        if not supported[precision]:
            other = [p for p in ("bf16", "fp32") if p != precision and (p == "fp32" or supported[p])]
            raise PreflightError(
                f"{path}: '{precision}.enabled' is true, but this machine's DeepSpeed accelerator "
                f"({accelerator.device_name()}) cannot run {precision} (get_accelerator().is_{precision}_supported() "
                f"is {supported[precision]}; every rank would stop in deepspeed.initialize); use a "
                f"{' or '.join(other)} config, e.g. ds_configs/zero2_{other[0]}.json")


def port_is_free(port: int) -> bool:
    """Whether a listening socket can take ``port`` on every interface (what torch's TCPStore on rank 0 does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def choose_port(port: int, given: bool) -> int:
    """``port`` if free; a busy port the user chose is an error, a busy default is replaced by a free one."""
    if not 0 < port < 65536:
        raise PreflightError(f"--master_port {port}: not a TCP port (1-65535)")
    if port_is_free(port):
        return port
    if given:
        raise PreflightError(f"--master_port {port} is already in use on this machine (another training run?); "
                             f"choose another, or leave --master_port out to have a free one picked")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a port the kernel says is free now
        s.bind(("", 0))
        chosen = s.getsockname()[1]
    print(f"launch.sh: port {port} (DeepSpeed's default master port) is in use; using --master_port {chosen}",
          file=sys.stderr)
    return chosen


def set_pairs(args: list[str]) -> list[str]:
    """The KEY=VALUE of every ``--set KEY=VALUE`` / ``--set=KEY=VALUE`` among the trainer's arguments."""
    pairs, i = [], 0
    while i < len(args):
        if args[i] == "--set" and i + 1 < len(args):
            pairs.append(args[i + 1])
            i += 2
            continue
        if args[i].startswith("--set="):
            pairs.append(args[i][len("--set="):])
        i += 1
    return pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ds_face.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("deepspeed_config")
    parser.add_argument("--port", type=int, help="the master port to check (single-node launch)")
    parser.add_argument("--port-given", action="store_true", help="the user chose --port: never replace it")
    parser.add_argument("--remote", action="store_true", help="a hostfile launch: check values sent to nodes")
    parser.add_argument("--env-file", action="append", default=[],
                        help="a .deepspeed_env file whose lines the runner exports (with --remote; repeatable)")
    parser.add_argument("--forward", action="append", default=[], metavar="NAME",
                        help="a variable launch.sh forwards from this shell (with --remote; repeatable)")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    opts = parser.parse_args(argv[:split])  # after "--": the trainer's arguments, as they are
    opts.args = argv[split + 1:]
    from ds_face.config import ConfigError, load_ds_config, load_run_config, parse_set_overrides
    try:
        if opts.remote:
            trainer_args = ["--config", opts.config, "--deepspeed_config", opts.deepspeed_config, *opts.args]
            lines = [line for path in opts.env_file for line in read_env_file(path)]
            lines += [("this shell, forwarded by launch.sh", f"{name}={os.environ.get(name, '')}")
                      for name in opts.forward]
            check_remote_values(trainer_args, lines, dict(os.environ))
        load_run_config(opts.config, parse_set_overrides(set_pairs(opts.args)))
        ds_config, _ = load_ds_config(opts.deepspeed_config, None)
        if not opts.remote:
            check_precision(ds_config, opts.deepspeed_config)
        if opts.port is not None:
            print(choose_port(opts.port, opts.port_given))
    except (ConfigError, PreflightError) as err:
        print(f"launch.sh: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
