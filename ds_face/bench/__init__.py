"""Benchmarks that print figures measured side by side in one run, as ratios (no timing assertions).

* ``ds_face.bench.head``: the Partial FC head alone, model parallel (sample_rate 1.0) vs Partial FC 0.1.
* ``ds_face.bench.engine_overhead``: a full training step under the DeepSpeed engine (ZeRO 0 / 2) vs plain DDP.
* ``python -m ds_face.bench memory``: memory per device, FC inside ZeRO 0-3 vs model parallel vs Partial FC,
  estimated (``estimator.py``) and, with ``--measure``, measured on local ranks (``cells.py``); the options
  it shares with ``speed`` are ``cli.py``.
* ``python -m ds_face.bench speed``: samples/s of the same cells, measured.
* ``python -m ds_face.bench report``: a per-machine training-speed report (markdown + PNG).

The head and engine benchmarks run under the deepspeed launcher; the ``python -m ds_face.bench`` commands
start their own ranks. See BENCHMARKS.md for commands and measured tables. The loader benchmark reads the
.rec it compares against, so it lives with the converters: ``data_prep.bench_loader``.

Imports run one way: the commands (memory, speed, report, head, engine_overhead) -> cli -> cells ->
estimator, configs -> this package's helpers; nothing here imports a command.
"""

from __future__ import annotations

import argparse
import os

from ds_face.runtime.cpus import threads_per_rank


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows "(default: X)" after every option that has a default (not after None or a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def common_args(p: argparse.ArgumentParser, *, classes: int, batch: int, steps: int, warmup: int,
                batch_help: str) -> argparse.ArgumentParser:
    """The options every benchmark shares, with its own defaults."""
    p.formatter_class = DefaultsHelpFormatter  # --help shows every default
    p.add_argument("--classes", type=int, default=classes, help="identities (class centres) of the head")
    p.add_argument("--embedding", type=int, default=512, help="embedding size")
    p.add_argument("--batch", type=int, default=batch, help=batch_help)
    p.add_argument("--steps", type=int, default=steps, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps first")
    p.add_argument("--sample-rate", type=float, default=0.1, help="the Partial FC rate")
    p.add_argument("--seed", type=int, default=2048, help="seed of the weights and the synthetic data")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    return p


def launched_threads_per_rank() -> int:
    """``threads_per_rank`` for a rank the deepspeed launcher started (its LOCAL_SIZE, else WORLD_SIZE)."""
    return threads_per_rank(int(os.environ.get("LOCAL_SIZE", os.environ.get("WORLD_SIZE", 1))))


def proc_status_kb(field: str) -> int:
    """A kB field of /proc/self/status (VmRSS: resident now, VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so that earlier peaks (imports, set-up) don't count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
