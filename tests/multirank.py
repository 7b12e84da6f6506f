"""Run a function on W real processes joined by a gloo process group (DeepSpeed's own init).

``run_ranks(2, fn, arg)`` starts two fresh Python processes, each calls
``deepspeed.init_distributed`` and then ``fn(rank, world_size, arg)``; whatever
``fn`` returns (tensors, numbers, strings in dicts/lists) comes back as a list
indexed by rank. A failure on any rank fails the caller with that rank's traceback.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ds_face.dist import exit_without_teardown, shutdown


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # W ranks share 2 cores; oversubscription makes gloo tests crawl
    out = Path(out_dir)
    try:
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
        torch.save(fn(rank, world_size, *args), out / f"rank{rank}.pt")
        shutdown()  # as ds_face.train ends a run
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise SystemExit(1)
    exit_without_teardown(0)


class RankFailed(AssertionError):
    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        super().__init__("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))


def run_ranks(world_size: int, fn, *args, timeout: float = 300.0) -> list:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, out_dir))
                 for r in range(world_size)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        errors = {r: (Path(out_dir) / f"rank{r}.err").read_text()
                  for r in range(world_size) if (Path(out_dir) / f"rank{r}.err").exists()}
        errors.update({r: f"still running after {timeout}s" for r in hung})
        errors.update({r: f"exit code {p.exitcode}" for r, p in enumerate(procs)
                       if p.exitcode and r not in errors})
        if errors:
            raise RankFailed(errors)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
