"""Run a function on W fresh processes joined by a process group (DeepSpeed's own init), without a launcher.

``run_ranks(2, fn, arg)`` starts two fresh Python processes (spawn), each calls
``ds_face.dist.init`` (DeepSpeed's init_distributed) and then ``fn(rank, world_size, arg)``; whatever
``fn`` returns (tensors, numbers, strings in dicts/lists) comes back as a list
indexed by rank. A failure on any rank raises ``RankFailed`` with every failed
rank's traceback (or exit code: -9 is the kernel's out-of-memory killer's).

Used by the tests (real multi-rank behaviour) and by ``ds_face.bench`` to measure
each cell in processes that hold nothing from the one before.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch

from ds_face.dist import exit_without_teardown, init, shutdown


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, threads: int, backend: str | None, fn, args, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), LOCAL_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)  # ranks share the cores; oversubscription makes gloo crawl
    out = Path(out_dir)
    try:
        from deepspeed.accelerator import get_accelerator
        accelerator = get_accelerator()
        if backend is None:  # the accelerator's own (NCCL on GPUs): one device per rank, chosen before any use
            backend = accelerator.communication_backend_name()
            if accelerator.device_name() != "cpu":
                accelerator.set_device(rank)
        init(dist_backend=backend, verbose=False)
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


def run_ranks(world_size: int, fn, *args, timeout: float = 300.0, threads: int = 1,
              env: dict[str, str] | None = None, backend: str | None = "gloo") -> list:
    """``env``: extra variables for the children only, set before they start (e.g. malloc tuning that the C
    library reads once, at process start). ``backend``: gloo (the default: CPU tensors, as the tests use) or
    None for the accelerator's own, with rank r on device r. When a rank fails or ``timeout`` seconds pass,
    the other ranks are killed rather than left waiting in a collective."""
    import time
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world_size, port, threads, backend, fn, args, out_dir))
                 for r in range(world_size)]
        saved = {k: os.environ.get(k) for k in env or {}}
        os.environ.update(env or {})
        try:
            for proc in procs:
                proc.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode for p in procs):  # a rank failed: its peers may wait for it in a collective,
                deadline = min(deadline, time.monotonic() + 15.0)  # but give them time to fail on their own
            time.sleep(0.1)
        hung = [r for r, p in enumerate(procs) if p.is_alive() and not any(q.exitcode for q in procs)]
        killed = [r for r, p in enumerate(procs) if p.is_alive() and r not in hung]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        errors = {r: (Path(out_dir) / f"rank{r}.err").read_text()
                  for r in range(world_size) if (Path(out_dir) / f"rank{r}.err").exists()}
        errors.update({r: f"still running after {timeout}s" for r in hung})
        errors.update({r: "killed: another rank failed first" if r in killed else f"exit code {p.exitcode}"
                       for r, p in enumerate(procs) if p.exitcode and r not in errors})
        if errors:
            raise RankFailed(errors)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
