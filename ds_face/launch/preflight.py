"""Checks ``launch.sh`` runs before DeepSpeed starts any rank, so that a bad launch fails in a second with one
clear message instead of on every node after start-up.

    python -m ds_face.launch.preflight RUN.yaml DS.json [--port N [--port-given] | --hostfile-launch] -- ARGS...

* **Both config files** (``ARGS`` holds the trainer's ``--set`` pairs): everything ``ds_face.config`` checks
  without the world size, ``output.dir`` included.
* **The precision against this machine** (single-node launches): an fp16 or bf16 DeepSpeed JSON is checked
  with DeepSpeed's own probe, ``get_accelerator().is_fp16_supported()`` / ``is_bf16_supported()`` (what the
  engine's sanity check asks after every rank has started, in ``deepspeed.initialize``). Importing DeepSpeed's
  accelerator costs torch + DeepSpeed's imports (~1.5 s warm on 2 cores), so fp32 configs skip it. Launches
  with a hostfile (``--hostfile-launch``) skip it too: the launching node need not be one that runs ranks.
* **The master port** (single-node launches): ``--port N --port-given`` (the user's ``--master_port``) must be
  free, or the launch stops naming it; without ``--port-given`` a busy default is replaced by a free port,
  printed on stdout and stated on stderr.
* **Values for a multi-node launch** (``launch.sh --hostfile`` runs ``ds_face.launch.multinode``, which quotes every
  value it sends to a node's shell): the values that must be of one kind are allow-listed here, one function
  per kind (``env_name_problem``, ``port_problem``, ``address_problem``; host names: ``ds_face.launch.hostfile``).
"""
from __future__ import annotations

import argparse
import re
import socket
import sys

from ds_face.launch.hostfile import host_problem, shown

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # what a POSIX shell accepts as a variable name
DEFAULT_MASTER_PORT = 29500  # deepspeed.constants.TORCH_DISTRIBUTED_DEFAULT_PORT


class PreflightError(ValueError):
    pass


def env_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be exported to a node as an environment variable, or None."""
    if ENV_NAME.fullmatch(name) and len(name) <= 255:
        return None
    return f"{shown(name)} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*, at most 255 characters)"


def port_problem(value: str) -> str | None:
    """Why ``value`` is not a TCP port number, or None."""
    if re.fullmatch(r"[0-9]{1,5}", value) and 0 < int(value) < 65536:
        return None
    return f"{shown(value)} is not a TCP port (an integer from 1 to 65535)"


def address_problem(value: str) -> str | None:
    """Why ``value`` is neither an IP address nor a host name (the master address), or None."""
    return None if host_problem(value) is None else f"{shown(value)} is neither an IP address nor a host name"


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
    parser = argparse.ArgumentParser(prog="ds_face.launch.preflight", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("deepspeed_config")
    parser.add_argument("--port", type=int, help="the master port to check (single-node launch)")
    parser.add_argument("--port-given", action="store_true", help="the user chose --port: never replace it")
    parser.add_argument("--hostfile-launch", action="store_true",
                        help="a launch with a hostfile: skip the precision probe (this machine may run no rank)")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    opts = parser.parse_args(argv[:split])  # after "--": the trainer's arguments, as they are
    opts.args = argv[split + 1:]
    from ds_face.config import ConfigError, load_ds_config, load_run_config, parse_set_overrides
    try:
        load_run_config(opts.config, parse_set_overrides(set_pairs(opts.args)))
        ds_config, _ = load_ds_config(opts.deepspeed_config, None)
        if not opts.hostfile_launch:
            check_precision(ds_config, opts.deepspeed_config)
        if opts.port is not None:
            print(choose_port(opts.port, opts.port_given))
    except (ConfigError, PreflightError) as err:
        print(f"launch.sh: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
