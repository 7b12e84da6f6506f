"""Build DeepSpeed's shared-memory op for CPU ranks ahead of the first launch (``make setup``'s last step).

    python -m ds_face.runtime.build_ops [--if-missing]

Where it is built and why there: ``ds_face/runtime/op_cache.py``. ``make setup`` runs this as its last step, and
``launch.sh`` runs it with ``--if-missing`` on a machine without a GPU (a venv set up before this step existed,
or a ``pip install``): a look for the built library (no torch import, milliseconds) and, only when it is
missing, the build, said in one line instead of a silent minute or more inside the first rank. The build is
DeepSpeed's own (``deepspeed.comm.torch.build_shm_op``, what every CPU rank's ``init_distributed`` calls), so it
builds exactly what the ranks load. On a GPU machine there is nothing to build: DeepSpeed's CUDA accelerator has
no such op, and ds_face uses no other JIT op.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ds_face.runtime.op_cache import SHM_OP, built_library
from ds_face.runtime.quiet import CPU_NOTICE, SHM_OP_LOADED, drop_deepspeed_log, printing_without


def build(if_missing: bool = False) -> int:
    """Build (or find built and load) the op DeepSpeed's CPU ranks load; one line on stdout, none with
    ``if_missing`` when it is built. 0 when the op is ready or not used here, 1 when the build failed."""
    if if_missing and built_library():
        return 0
    drop_deepspeed_log("real_accelerator", CPU_NOTICE)  # this command's own line says "for CPU ranks"
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":  # only DeepSpeed's CPU accelerator has the op
        if not if_missing:
            print(f"ds_face.runtime.build_ops: nothing to build: DeepSpeed's {accelerator.device_name()} accelerator does "
                  f"not use its {SHM_OP} op here")
        return 0
    folder = os.environ.get("TORCH_EXTENSIONS_DIR") or "torch's default, ~/.cache/torch_extensions"
    before = built_library()
    stamp = os.stat(before).st_mtime_ns if before else None
    if before:  # torch compares sources and flags, ninja rebuilds what changed (nothing, usually), and it loads
        print(f"ds_face.runtime.build_ops: checking DeepSpeed's {SHM_OP} op in {folder} ...", end="", flush=True)
    else:
        print(f"ds_face.runtime.build_ops: building DeepSpeed's {SHM_OP} op for CPU ranks into {folder} "
              f"(once per venv: 0.5-1 min on 2 idle cores, more on busy ones) ...", end="", flush=True)
    start = time.monotonic()
    try:
        with printing_without(SHM_OP_LOADED):  # DeepSpeed's line after the load: this command's line says it
            op = build_shm_op()
    except Exception as err:  # a compiler or ninja problem: every rank would fail the same way, later
        print(f" failed: {type(err).__name__}: {err}", flush=True)
        return 1
    if op is None:  # DeepSpeed's builder reports the op incompatible with this machine: the ranks go without
        print(f" not used: DeepSpeed reports its {SHM_OP} op incompatible here", flush=True)
        return 0
    after = built_library()
    if before and after and os.stat(after).st_mtime_ns == stamp:
        print(" up to date", flush=True)
    else:
        print(f" {'rebuilt' if before else 'done'} in {time.monotonic() - start:.0f} s", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ds_face.runtime.build_ops", description=__doc__.splitlines()[0])
    parser.add_argument("--if-missing", action="store_true",
                        help="do nothing, silently, when the built op is found (launch.sh runs this before the ranks)")
    opts = parser.parse_args(argv)
    return build(if_missing=opts.if_missing)


if __name__ == "__main__":
    sys.exit(main())
