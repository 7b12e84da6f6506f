"""``python -m ds_face.bench <command> ...``: benchmarks that need no launcher.

* ``memory``: memory per device, ZeRO stages vs model parallel vs Partial FC: estimated, ``--measure``d;
* ``speed``: samples/s per cell, measured;
* ``report``: a hardware report (machine spec + samples/s over batch x precision x Partial FC on/off).
"""
from __future__ import annotations

import sys

COMMANDS = {"memory": "ds_face.bench.memory", "speed": "ds_face.bench.speed", "report": "ds_face.bench.report"}
USAGE = f"usage: python -m ds_face.bench {{{','.join(COMMANDS)}}} [options]  (--help after a command for its options)"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"{USAGE}\npython -m ds_face.bench: error: unknown command {argv[0]!r}; valid: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    import importlib
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
