"""``python -m ds_face.bench <command> ...``: benchmarks that need no launcher.

* ``memory``: memory per device, ZeRO stages vs model parallel vs Partial FC: estimated, ``--measure``d;
* ``speed``: samples/s per cell, measured;
* ``report``: a hardware report (machine spec + samples/s over batch x precision x Partial FC on/off);
* ``head-storage``: the head's state on device / host / disk: peak anonymous memory and step time, measured;
  ``--loss-curve``: the loss with float32 / bfloat16 / float16 storage.
"""
from __future__ import annotations

import sys

COMMANDS = {"memory": "ds_face.bench.memory", "speed": "ds_face.bench.speed", "report": "ds_face.bench.report",
            "head-storage": "ds_face.bench.head_storage"}
USAGE = f"usage: python -m ds_face.bench {{{','.join(COMMANDS)}}} [options]  (--help after a command for its options)"
HELP = f"""{USAGE}

Benchmarks that start their own local ranks (CPU ranks, or one per GPU) and need no launcher:

  memory   memory per device: the FC inside ZeRO 0-3 vs model parallel vs Partial FC, estimated
           (any backbone, class counts, ranks, precision); --measure also runs real steps per cell;
           --compare-seed puts the estimator beside the Partial FC benchmark published with InsightFace
  speed    samples/s of the same cells, measured, and each cell / a baseline cell (same run)
  report   a per-machine training-speed report (spec table, batch x precision x Partial FC on/off,
           markdown + PNG), shaped like InsightFace's per-GPU reports
  head-storage
           the head's centres and optimizer state on device / host / disk: peak RssAnon per rank and step
           time at 1M and 4M identities, same rows per step; --loss-curve: float32 vs bfloat16 vs float16
           storage in real training, loss per step

e.g.  python -m ds_face.bench memory --backbone r100 --world-size 8 --classes 2000000 --device-memory 80GB
      python -m ds_face.bench report --out reports/$(hostname).md
The head and engine-overhead benchmarks run under the deepspeed launcher (python -m ds_face.bench.head,
ds_face.bench.engine_overhead --help); commands and measured tables: BENCHMARKS.md."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP if argv else USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"{USAGE}\npython -m ds_face.bench: error: unknown command {argv[0]!r}; valid: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    import importlib
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
