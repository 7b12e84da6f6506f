"""Warnings nobody running ds_face can act on, dropped at process start (``import ds_face`` calls ``quiet()``).

Each is matched exactly, by message and by the module that emits it; everything else still shows:

* ``FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated`` (attributed to
  ``torch.distributed.c10d_logger``), printed once by every rank: DeepSpeed 0.19.8's communication layer calls
  that function (ZeRO's gathers); ds_face never does.
* DeepSpeed's log line ``**** You are using ZeRO with an untested optimizer, proceed with caution *****``
  (logger ``DeepSpeed``, from ``deepspeed.runtime.engine``): ds_face hands DeepSpeed a plain ``torch.optim``
  SGD/AdamW on purpose (``zero_allow_untested_optimizer`` in every JSON), tested by ``tests/test_engine.py``.

* DeepSpeed's ``DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully``, a bare ``print`` by
  every CPU rank each time ``init_distributed`` *loads* the op (built once, at set-up: ``ds_face.runtime.build_ops``);
  ``ds_face.runtime.dist.init`` runs it inside ``printing_without(SHM_OP_LOADED)``.

Kept on purpose: DeepSpeed's ``Setting accelerator to CPU. If you have GPU ...`` (on a GPU machine it means
CUDA was not found; only ``ds_face.runtime.build_ops``, whose own line says "for CPU ranks", drops it), and every
warning about the user's own data, configs or checkpoints.

DeepSpeed's log lines are dropped by ONE filter on its logger (``drop_deepspeed_log`` adds a line to it).
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings

from ds_face.runtime.op_cache import SHM_OP

ALL_GATHER_DEPRECATED = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"
UNTESTED_OPTIMIZER = "You are using ZeRO with an untested optimizer, proceed with caution"
SHM_OP_LOADED = f"DeepSpeed deepspeed.ops.comm.{SHM_OP}_op built successfully"  # deepspeed/comm/torch.py
CPU_NOTICE = "Setting accelerator to CPU"  # deepspeed/accelerator/real_accelerator.py


class _DropDeepSpeedLines(logging.Filter):
    """The one filter on DeepSpeed's logger: a record is dropped when it comes from one of ``dropped``'s
    modules (``record.module``, a file name without .py) and holds that module's text; any other shows."""

    def __init__(self):
        super().__init__()
        self.dropped: set[tuple[str, str]] = set()  # (module, text)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.module == module and text in record.getMessage() for module, text in self.dropped)


_FILTER = _DropDeepSpeedLines()


def drop_deepspeed_log(module: str, text: str) -> None:
    """Drop, in this process, DeepSpeed's log records from ``module`` that hold ``text`` (idempotent)."""
    _FILTER.dropped.add((module, text))
    deepspeed_logger = logging.getLogger("DeepSpeed")  # the logger DeepSpeed creates and logs through
    if _FILTER not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(_FILTER)


def quiet() -> None:
    """Drop the warning and the log line above (idempotent). Cheap: imports neither torch nor DeepSpeed."""
    warnings.filterwarnings("ignore", message=ALL_GATHER_DEPRECATED, category=FutureWarning,
                            module=r"torch\.distributed\.c10d_logger")
    drop_deepspeed_log("engine", UNTESTED_OPTIMIZER)


@contextlib.contextmanager
def printing_without(line: str):
    """Within the block, what is printed to stdout is held back and written out at its end, less every line
    that is exactly ``line`` (also when the block raises)."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stdout(held):
            yield
    finally:
        kept = [text for text in held.getvalue().splitlines(keepends=True) if text.rstrip("\n") != line]
        sys.stdout.write("".join(kept))
        sys.stdout.flush()
