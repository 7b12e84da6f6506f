"""Rank 0's view of training: arcface_torch-style progress lines, a log file and tensorboard."""
from __future__ import annotations

import datetime
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("ds_face")


def setup_logging(rank: int, output_dir: Path | None) -> None:
    """Rank 0 logs INFO to stdout and ``<output>/training.log``; other ranks only warnings. Lines start with the
    local date and time (``2026-12-01 18:53:38 [rank 0] ...``)."""
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    log.handlers.clear()
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if rank == 0 and output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        # appended to, never through a link: O_NOFOLLOW refuses a planted training.log link (WriteError names it)
        path = output_dir / "training.log"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            from ds_face.fileio import WriteError
            raise WriteError(f"{path}: cannot append the log ({err.strerror}; a symbolic link there is refused, "
                             f"never followed)") from None
        handlers.append(logging.StreamHandler(os.fdopen(fd, "a", encoding="utf-8")))
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)


class Progress:
    """Averages loss over ``every`` optimizer steps and reports speed, LR, loss scale and ETA."""

    def __init__(self, total_steps: int, samples_per_step: int, every: int,
                 tensorboard_dir: Path | None = None, start_step: int = 0):
        self.total_steps, self.samples_per_step, self.every = total_steps, samples_per_step, every
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: only rank 0 needs it
            self.writer = SummaryWriter(str(tensorboard_dir))
        self._reset(start_step)

    def _reset(self, step: int) -> None:
        self.loss_sum, self.loss_count = 0.0, 0
        self.since_step, self.since_time = step, time.perf_counter()

    def update(self, loss: float, step: int, epoch: int, lr: float, loss_scale: float | None,
               head_skipped: int) -> None:
        """Call once per optimizer step, with ``step`` = optimizer steps done so far."""
        self.loss_sum += loss
        self.loss_count += 1
        if step % self.every and step != self.total_steps:
            return
        elapsed = time.perf_counter() - self.since_time
        speed = (step - self.since_step) * self.samples_per_step / max(elapsed, 1e-9)
        eta = elapsed / max(step - self.since_step, 1) * (self.total_steps - step)
        loss_avg = self.loss_sum / max(self.loss_count, 1)
        line = (f"Speed {speed:.2f} samples/sec   Loss {loss_avg:.4f}   LearningRate {lr:.6f}   "
                f"Epoch: {epoch}   Global Step: {step}/{self.total_steps}")
        if loss_scale is not None:
            line += f"   Loss Scale: {loss_scale:g}"
        if head_skipped:
            line += f"   Skipped: {head_skipped}"
        log.info(line + f"   ETA: {datetime.timedelta(seconds=round(eta))}")
        if self.writer is not None:
            for name, value in (("loss", loss_avg), ("lr", lr), ("samples_per_sec", speed),
                                ("steps_skipped", head_skipped)):
                self.writer.add_scalar(f"train/{name}", value, step)
            if loss_scale is not None:
                self.writer.add_scalar("train/loss_scale", loss_scale, step)
            self.writer.flush()
        self._reset(step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
