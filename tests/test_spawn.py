"""ds_face.runtime.spawn's deadline fails a hang, not a busy machine: real rank processes, a real collective that never
completes, a rank spinning forever, and ranks slowed by processes hogging every core."""
import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from ds_face.runtime.spawn import RankFailed, run_command, run_ranks


def _stuck_in_a_collective(rank, world_size):
    import torch
    if rank == 0:
        torch.distributed.all_reduce(torch.ones(4))  # rank 1 never joins: rank 0 waits, using no CPU
    else:
        time.sleep(3600)


def _spinning(rank, world_size):
    while True:
        pass


def _cpu_work(rank, world_size, seconds):
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    return rank


def _hog():
    while True:
        pass


@pytest.mark.parametrize("fn", [_stuck_in_a_collective, _spinning])
def test_a_hang_fails_after_the_timeout(fn):
    with pytest.raises(RankFailed) as failure:  # start-up counts too; then the idle or full-core clock runs out
        run_ranks(2, fn, timeout=6)
    assert "still running after a 6s deadline" in str(failure.value)


def test_a_busy_machine_stretches_the_deadline():
    """Each rank needs 2 CPU seconds (plus ~3 of start-up); 2 hogs a core leave it about a third of one, so the
    work takes well over the 8 s a wall-clock deadline would allow (31 s here, 2 cores); this deadline does not
    fire."""
    hogs = [multiprocessing.get_context("fork").Process(target=_hog, daemon=True)
            for _ in range(2 * (os.cpu_count() or 1))]
    for hog in hogs:
        hog.start()
    try:
        assert run_ranks(2, _cpu_work, 2.0, timeout=8) == [0, 1]
    finally:
        for hog in hogs:
            hog.kill()
            hog.join()


def test_run_command_kills_a_hung_command_and_keeps_its_output():
    with pytest.raises(subprocess.TimeoutExpired) as expired:
        run_command([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(3600)"], timeout=3)
    assert expired.value.output == "started\n"
    done = run_command([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                       timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
