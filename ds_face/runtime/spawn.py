"""Run a function on W fresh processes joined by a process group (DeepSpeed's own init), without a launcher.

``run_ranks(2, fn, arg)`` starts two fresh Python processes (spawn), each calls
``ds_face.runtime.dist.init`` (DeepSpeed's init_distributed) and then ``fn(rank, world_size, arg)``; whatever
``fn`` returns (tensors, numbers, strings in dicts/lists) comes back as a list
indexed by rank. A failure on any rank raises ``RankFailed`` with every failed
rank's traceback (or exit code: -9 is the kernel's out-of-memory killer's).

Used by the tests (real multi-rank behaviour) and by ``ds_face.bench`` to measure
each cell in processes that hold nothing from the one before. ``run_command`` is ``subprocess.run`` with the
same deadline (``Deadline``), for the tests' real launches.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
import traceback
from pathlib import Path

import torch

from ds_face.runtime.dist import exit_without_teardown, init, shutdown


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


class Deadline:
    """``seconds`` that fail only a hang, not a slow or busy machine (``expired()``: call it often).

    The deadline runs on a clock that goes as fast as the machine lets the watched processes (and their children)
    run: each second it advances by the largest share of a core any of them used (CPU seconds / wall seconds, at
    most 1), or by the whole second when none used more than 2% (every process waiting, which is what a hang in a
    collective looks like: a rank blocked in gloo uses ~0.1% of a core). So a machine whose load leaves a rank a
    quarter of a core stretches the wall-clock deadline four-fold, while a deadlock, or a rank spinning on a whole
    core, still fails after ``seconds``. (What made ``make test`` hit the old wall-clock 300 s: DeepSpeed's shm
    op compiled inside the first ranks, 0.5-3.5 min, on a machine busy with other work; it is now built at set-up,
    ds_face/runtime/build_ops.py.)
    """
    IDLE = 0.02  # of a core: below it for every process, the second counts in full

    def __init__(self, seconds: float, pids):
        import psutil
        self.seconds, self.used, self._psutil = seconds, 0.0, psutil
        self._roots = [psutil.Process(pid) for pid in pids]
        self._last, self._cpu = time.monotonic(), self._sample()

    def _sample(self) -> dict[int, float]:
        cpu = {}
        for root in self._roots:
            try:
                family = [root, *root.children(recursive=True)]
            except self._psutil.Error:
                continue
            for proc in family:
                try:
                    times = proc.cpu_times()
                    cpu[proc.pid] = times.user + times.system
                except self._psutil.Error:
                    pass
        return cpu

    def expired(self) -> bool:
        now = time.monotonic()
        wall = now - self._last
        if wall >= 1.0:
            cpu = self._sample()
            share = max((t - self._cpu.get(pid, 0.0) for pid, t in cpu.items()), default=0.0) / wall
            self.used += wall if share <= self.IDLE else wall * min(share, 1.0)
            self._last, self._cpu = now, cpu
        return self.used >= self.seconds


def run_command(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)`` with a ``Deadline``
    over the command and everything it starts; past it the whole process group is killed and
    ``subprocess.TimeoutExpired`` raised, with what the command had printed."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, start_new_session=True, **kwargs)
        deadline = Deadline(timeout, [proc.pid])
        while proc.poll() is None and not deadline.expired():
            time.sleep(0.1)
        expired = proc.poll() is None
        if expired:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if expired:
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


class RankFailed(AssertionError):
    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        super().__init__("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))


def run_ranks(world_size: int, fn, *args, timeout: float = 300.0, threads: int = 1,
              env: dict[str, str] | None = None, backend: str | None = "gloo") -> list:
    """``env``: extra variables for the children only, set before they start (e.g. malloc tuning that the C
    library reads once, at process start). ``backend``: gloo (the default: CPU tensors, as the tests use) or
    None for the accelerator's own, with rank r on device r. When a rank fails or the ``timeout`` passes (a
    ``Deadline``: a busy machine stretches it, a hang does not), the other ranks are killed rather than left
    waiting in a collective."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        started = time.monotonic()
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
        deadline, failed_at = Deadline(timeout, [p.pid for p in procs]), None
        while any(p.is_alive() for p in procs) and not deadline.expired():
            if failed_at is None and any(p.exitcode for p in procs):  # a rank failed: its peers may wait for it
                failed_at = time.monotonic()  # in a collective, but give them time to fail on their own
            if failed_at is not None and time.monotonic() - failed_at > 15.0:
                break
            time.sleep(0.1)
        hung = [r for r, p in enumerate(procs) if p.is_alive() and not any(q.exitcode for q in procs)]
        killed = [r for r, p in enumerate(procs) if p.is_alive() and r not in hung]
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        errors = {r: (Path(out_dir) / f"rank{r}.err").read_text()
                  for r in range(world_size) if (Path(out_dir) / f"rank{r}.err").exists()}
        errors.update({r: f"still running after a {timeout}s deadline ({time.monotonic() - started:.0f}s of wall "
                          f"clock)" for r in hung})
        errors.update({r: "killed: another rank failed first" if r in killed else f"exit code {p.exitcode}"
                       for r, p in enumerate(procs) if p.exitcode and r not in errors})
        if errors:
            raise RankFailed(errors)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
