"""How many worker processes or threads this machine's cores give a job: one rule, every command that starts
workers (IJB decode + align, data_prep's conversion and verification, the evaluator, the benchmarks)."""
from __future__ import annotations

import os

MAX_WORKERS = 8  # past 8 decoders the disk or the one consumer of their results is the limit, not the cores


def cores() -> int:
    """Logical cores this process may see (1 when the platform does not say)."""
    return os.cpu_count() or 1


def worker_processes() -> int:
    """The default worker count: one per core, at most MAX_WORKERS."""
    return min(MAX_WORKERS, cores())


def threads_per_rank(local_ranks: int) -> int:
    """The cores split between this machine's ranks; oversubscribed ranks make gloo collectives crawl."""
    return max(1, cores() // max(1, local_ranks))
