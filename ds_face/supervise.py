"""Process supervision: when a rank dies, its siblings say which one, instead of a bare collective error."""
from __future__ import annotations

import os
import sys


def watch_sibling_ranks(rank: int):
    """Name the rank that died when this one is stopped because of it; returns ``dead() -> str``.

    A rank killed outright (OOM killer, kill -9) cannot say so itself. Its siblings on the node see it
    either as a failed collective (gloo: connection reset) or as the launcher's SIGTERM (deepspeed's
    launch.py and torchrun stop the others when one exits non-zero; launch.py's message names the last
    rank it spawned, not the dead one). Both paths print ``ds_face.train: rank R: rank K (pid P) died``.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) < 2 or "LOCAL_RANK" not in os.environ:
        return lambda: ""  # not started by a launcher
    import signal

    import psutil
    try:  # the launcher's other children, all spawned once init_distributed returned: {pid: RANK}
        siblings = {p.pid: p.environ().get("RANK", "?") for p in psutil.Process(os.getppid()).children()
                    if p.pid != os.getpid()}
    except (psutil.Error, OSError):
        siblings = {}

    def dead() -> str:
        def gone(pid):
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                return True
        return ", ".join(f"rank {r} (pid {pid}) died" for pid, r in sorted(siblings.items()) if gone(pid))

    def on_sigterm(signum, frame):
        why = dead() or "no other rank on this node died (a rank on another node, or a user's stop)"
        print(f"ds_face.train: rank {rank}: stopped by SIGTERM: {why}", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    signal.signal(signal.SIGTERM, on_sigterm)
    return dead
