"""Warnings nobody running ds_face can act on, dropped at process start (``import ds_face`` calls ``quiet()``).

Each is matched exactly, by message and by the module that emits it; everything else still shows:

* ``FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated`` (attributed to
  ``torch.distributed.c10d_logger``), printed once by every rank: DeepSpeed 0.19.8's communication layer calls
  that function (ZeRO's gathers); ds_face never does.
* DeepSpeed's log line ``**** You are using ZeRO with an untested optimizer, proceed with caution *****``
  (logger ``DeepSpeed``, from ``deepspeed.runtime.engine``): ds_face hands DeepSpeed a plain ``torch.optim``
  SGD/AdamW on purpose (``zero_allow_untested_optimizer`` in every JSON), tested by ``tests/test_engine.py``.

Kept on purpose: DeepSpeed's ``Setting accelerator to CPU. If you have GPU ...`` (on a GPU machine it means
CUDA was not found), and every warning about the user's own data, configs or checkpoints.
"""
from __future__ import annotations

import logging
import warnings

ALL_GATHER_DEPRECATED = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"
UNTESTED_OPTIMIZER = "You are using ZeRO with an untested optimizer, proceed with caution"


class _DropUntestedOptimizer(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.module == "engine" and UNTESTED_OPTIMIZER in record.getMessage())


_FILTER = _DropUntestedOptimizer()


def quiet() -> None:
    """Install both filters (idempotent). Cheap: imports neither torch nor DeepSpeed."""
    warnings.filterwarnings("ignore", message=ALL_GATHER_DEPRECATED, category=FutureWarning,
                            module=r"torch\.distributed\.c10d_logger")
    deepspeed_logger = logging.getLogger("DeepSpeed")  # the logger DeepSpeed creates and logs through
    if _FILTER not in deepspeed_logger.filters:
        deepspeed_logger.addFilter(_FILTER)
