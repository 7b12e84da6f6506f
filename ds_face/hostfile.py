"""Check a DeepSpeed hostfile before any rank starts: ``python -m ds_face.hostfile FILE``.

Every non-comment line must be ``HOST slots=N`` (N a positive integer), no host twice, and every
host must resolve on this machine (the resolver ``getent hosts`` uses: /etc/hosts, DNS, ...).
DeepSpeed's own parser silently skips some malformed lines and only fails later, over ssh, so
launch.sh calls this first. Exit 0 when the file is good, 2 with ``error: FILE line K: ...`` when not.
"""
from __future__ import annotations

import argparse
import re
import socket
import sys

LINE = re.compile(r"^(\S+)\s+slots=(\S+)$")


class HostfileError(ValueError):
    pass


def parse_hostfile(path: str, resolve: bool = True) -> dict[str, int]:
    """Return {host: slots} in file order, or raise HostfileError naming the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise HostfileError(f"{path}: no such hostfile") from None
    except (OSError, UnicodeDecodeError) as err:
        raise HostfileError(f"{path}: cannot read hostfile: {err}") from None
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue

        def fail(problem: str):
            raise HostfileError(f"{path} line {number}: {problem}: {raw.strip()!r}")

        match = LINE.match(line)
        if not match:
            fail("expected 'HOST slots=N'")
        host, slots = match.groups()
        if not re.fullmatch(r"[0-9]+", slots) or int(slots) < 1:
            fail(f"slots must be a positive integer, got {slots!r}")
        if host in hosts:
            fail(f"host {host!r} listed twice (first on line {first_line[host]})")
        if resolve:
            try:
                socket.getaddrinfo(host, None)
            except (socket.gaierror, UnicodeError) as err:
                fail(f"host {host!r} does not resolve ({err})")
        hosts[host] = int(slots)
        first_line[host] = number
    if not hosts:
        raise HostfileError(f"{path}: no hosts (every line is blank or a comment)")
    return hosts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="ds_face.hostfile", description=__doc__.splitlines()[0].split(":")[0] + ".",
        epilog="Each non-comment line is 'HOST slots=N' (N > 0); every host must resolve here and appear once. "
               "Exit status 0: the file is good; 2: 'error: FILE line K: ...' on stderr.")
    parser.add_argument("hostfile", help="DeepSpeed hostfile, e.g. a copy of hostfile.example")
    args = parser.parse_args(argv)
    try:
        hosts = parse_hostfile(args.hostfile)
    except HostfileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.hostfile}: {len(hosts)} hosts, {sum(hosts.values())} slots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
