"""Check a DeepSpeed hostfile before any rank starts: ``python -m ds_face.launch.hostfile FILE``.

Every non-comment line must be ``HOST slots=N``: HOST a host name (RFC 1123) or an IP address, N an integer
from 1 to MAX_SLOTS, no host twice, and every host must resolve on this machine (the resolver ``getent hosts``
uses: /etc/hosts, DNS, ...). Host names are an allow-list because they reach ``ssh`` and the nodes' logs: a
name such as ``-oProxyCommand=...`` or ``a;b`` is refused, not escaped. ``select_slots`` applies DeepSpeed's
--include/--exclude/--num_nodes/--num_gpus to the parsed file. Exit 0 when the file is good, 2 with
``error: FILE line K: ...`` when not.
"""
from __future__ import annotations

import argparse
import ipaddress
import re
import socket
import sys

LINE = re.compile(r"^(\S+)\s+slots=(\S+)$", re.ASCII)  # ASCII: a no-break space is no separator
# RFC 1123: dot-separated labels of letters, digits and '-', 1-63 characters each, no '-' at either end.
LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_SLOTS = 1024  # ranks on one node: far above any machine's accelerators, small enough to list
MAX_BYTES = 1 << 20  # a hostfile of 1 MiB already names ~50,000 nodes


class HostfileError(ValueError):
    pass


def shown(value: str, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a refusal names a value in one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + "...'" + f" ({len(value)} characters)"


def host_problem(host: str) -> str | None:
    """Why ``host`` is not a host name or an IP address, or None."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if len(host) <= 253 and all(LABEL.fullmatch(label) for label in host.split(".")):
        return None
    return (f"{shown(host)} is not a host name (RFC 1123: labels of letters, digits and '-', 1-63 characters, "
            f"no '-' at either end, joined by '.') nor an IP address")


def parse_hostfile(path: str, resolve: bool = True) -> dict[str, int]:
    """Return {host: slots} in file order, or raise HostfileError naming the file and line."""
    from ds_face.config.bounded import NotARegularFile, read_at_most
    try:  # bounded, and a fifo is refused rather than waited on
        data = read_at_most(path, MAX_BYTES)
    except NotARegularFile:
        raise HostfileError(f"{path}: not a regular file; a hostfile is a text file of 'HOST slots=N' lines") \
            from None
    except FileNotFoundError:
        raise HostfileError(f"{path}: no such hostfile") from None
    except OSError as err:
        raise HostfileError(f"{path}: cannot read hostfile: {err.strerror}") from None
    if len(data) > MAX_BYTES:
        raise HostfileError(f"{path}: larger than {MAX_BYTES} bytes; is it a hostfile ('HOST slots=N' lines)?")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise HostfileError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue

        def fail(problem: str):
            raise HostfileError(f"{path} line {number}: {problem}: {shown(raw.strip())}")

        match = LINE.match(line)
        if not match:
            fail("expected 'HOST slots=N'")
        host, slots = match.groups()
        problem = host_problem(host)
        if problem:
            fail(f"host {problem}")
        if not re.fullmatch(r"[0-9]{1,4}", slots) or not 1 <= int(slots) <= MAX_SLOTS:
            fail(f"slots must be an integer from 1 to {MAX_SLOTS}, got {shown(slots)}")
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


def _node_specs(option: str, text: str, hosts: dict[str, int]) -> dict[str, list[int]]:
    """DeepSpeed's NODE_SPEC[@NODE_SPEC ...], NODE_SPEC = HOST[:SLOT[,SLOT ...]]: {host: slots ([] = all)}."""
    specs: dict[str, list[int]] = {}
    for spec in text.split("@"):
        host, colon, slot_list = spec.partition(":")
        if host not in hosts:
            raise HostfileError(f"{option} {shown(text)}: host {shown(host)} is not in the hostfile")
        slots = specs.setdefault(host, [])
        for slot in slot_list.split(",") if colon else []:
            if not re.fullmatch(r"[0-9]{1,4}", slot) or int(slot) >= hosts[host]:
                raise HostfileError(f"{option} {shown(text)}: slot {shown(slot)} of {host} is not one of "
                                    f"0-{hosts[host] - 1} (slots={hosts[host]})")
            if int(slot) not in slots:
                slots.append(int(slot))
    return specs


def select_slots(hosts: dict[str, int], include: str = "", exclude: str = "", num_nodes: int = -1,
                 num_gpus: int = -1) -> dict[str, list[int]]:
    """The slots a launch uses on each host, {host: [slot, ...]} in hostfile order, as DeepSpeed's runner picks
    them: --include (only these hosts/slots), --exclude (all but these), --num_nodes (the first N hosts),
    --num_gpus (slots 0..N-1 on each). Raise HostfileError naming the option that does not fit the file."""
    if include and exclude:
        raise HostfileError("--include and --exclude cannot be used together")
    if (include or exclude) and (num_nodes > 0 or num_gpus > 0):
        raise HostfileError("--num_nodes/--num_gpus cannot be used with --include/--exclude")
    active = {host: list(range(slots)) for host, slots in hosts.items()}
    if include:
        specs = _node_specs("--include", include, hosts)
        active = {host: sorted(specs[host]) or active[host] for host in hosts if host in specs}
    if exclude:
        specs = _node_specs("--exclude", exclude, hosts)
        active = {host: [s for s in slots if specs[host] and s not in specs[host]] if host in specs else slots
                  for host, slots in active.items()}
        active = {host: slots for host, slots in active.items() if slots}
    if num_nodes > 0:
        if num_nodes > len(active):
            raise HostfileError(f"--num_nodes {num_nodes}: the hostfile has {len(active)} hosts")
        active = dict(list(active.items())[:num_nodes])
    if num_gpus > 0:
        short = [host for host in active if hosts[host] < num_gpus]
        if short:
            raise HostfileError(f"--num_gpus {num_gpus}: more than the slots of {', '.join(short)} "
                                f"(slots={min(hosts[h] for h in short)})")
        active = {host: list(range(num_gpus)) for host in active}
    if not active:
        raise HostfileError("no slots left to run on after --include/--exclude")
    return active


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="ds_face.launch.hostfile", description=__doc__.splitlines()[0].split(":")[0] + ".",
        epilog=f"Each non-comment line is 'HOST slots=N' (HOST a host name or IP address, 1 <= N <= {MAX_SLOTS}); "
               "every host must resolve here and appear once. "
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
