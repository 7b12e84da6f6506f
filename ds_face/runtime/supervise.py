"""Process supervision: when a rank dies, its siblings say which one, instead of a bare collective error."""
from __future__ import annotations

import os
import select
import sys
import time

# How long a failed collective waits for a sibling's death to become visible. A rank killed outright closes its
# sockets (so the survivors' collective fails) before the kernel marks it exited; on a loaded machine the gap
# can be long, and reading its state at once then blames "another node". An exit ends the wait at once.
SETTLE_S = 15.0


def watch_sibling_ranks(rank: int):
    """Name the rank that died when this one is stopped because of it; returns ``dead(wait=0.0) -> str``.

    A rank killed outright (OOM killer, kill -9) cannot say so itself. Its siblings on the node see it
    either as a failed collective (gloo: connection reset) or as the launcher's SIGTERM (deepspeed's
    launch.py and torchrun stop the others when one exits non-zero; launch.py's message names the last
    rank it spawned, not the dead one). Both paths print ``ds_face.train: rank R: rank K (pid P) died``.
    Each sibling is held by a pidfd, opened at start: it turns readable when that process has exited (also
    once reaped, and whatever process gets the pid next), so nothing is read from a pid's state at the wrong time.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) < 2 or "LOCAL_RANK" not in os.environ:
        return lambda wait=0.0: ""  # not started by a launcher
    import signal

    import psutil
    try:  # the launcher's other children, all spawned once init_distributed returned: {pid: RANK}
        siblings = {p.pid: p.environ().get("RANK", "?") for p in psutil.Process(os.getppid()).children()
                    if p.pid != os.getpid()}
    except (psutil.Error, OSError):
        siblings = {}
    handles = {}
    for pid in siblings:
        try:
            handles[pid] = os.pidfd_open(pid)
        except (OSError, AttributeError):  # gone already, or no pidfd (Linux < 5.3): its state is read instead
            handles[pid] = None

    def exited(pid: int) -> bool:
        if handles[pid] is not None:
            return bool(select.select([handles[pid]], [], [], 0)[0])
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def dead(wait: float = 0.0) -> str:
        """The siblings that have exited; with ``wait``, up to that many seconds for a first one to show."""
        if not siblings:  # the only rank on its node (an elastic node of one rank): nothing to wait for
            return ""
        deadline = time.monotonic() + wait
        while True:
            gone = [pid for pid in sorted(siblings) if exited(pid)]
            left = deadline - time.monotonic()
            if gone or left <= 0:
                return ", ".join(f"rank {siblings[pid]} (pid {pid}) died" for pid in gone)
            fds = [fd for fd in handles.values() if fd is not None]
            if fds and len(fds) == len(handles):
                select.select(fds, [], [], left)  # wakes at the first exit
            else:
                time.sleep(min(left, 0.05))

    def on_sigterm(signum, frame):
        # the launcher stops the survivors after it has reaped the dead rank: its exit is visible by now
        if os.environ.get("TORCHELASTIC_RUN_ID"):  # torch's elastic agent stops its workers to re-rendezvous
            why = dead() or "by the elastic agent (a node left or joined: the run resumes `latest`)"
        else:
            why = dead() or "no other rank on this node died (a rank on another node, or a user's stop)"
        print(f"ds_face.train: rank {rank}: stopped by SIGTERM: {why}", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    signal.signal(signal.SIGTERM, on_sigterm)
    return dead
