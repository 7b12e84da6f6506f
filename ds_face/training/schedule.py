"""Learning-rate schedule: linear warm-up, then polynomial decay to zero (arcface_torch's PolyScheduler), as a
function of SAMPLES seen, not of steps.

A step's LR is the curve at the samples seen once that step is done: the first step of a warm-up of w
samples gets G / w of the base LR, and the run's last step gets exactly 0. Counting samples instead of steps
makes a run resized after a lost node follow the uninterrupted run's curve: 2 ranks x 64 and 3 ranks x 64
reach the same LR at the same sample count (deepinsight/insightface#1996 is the step-counting version of
this bug, under gradient accumulation).

The horizon is where the run's last whole step ends (`ds_face.data.order.run_end`): epochs x N, less the
last < G samples that do not fill a step. When a resize changes the global batch G, that remainder
changes, so the horizon moves by less than one global batch; the curve is otherwise the same.
"""
from __future__ import annotations

import math


class PolyWarmup:
    """Multiplier of the base LR once ``done`` units (samples, or steps) of ``total`` are done."""

    def __init__(self, total: int, warmup: int = 0, power: float = 2.0):
        if total < 1 or not 0 <= warmup < total:
            raise ValueError(f"need 0 <= warmup ({warmup}) < total ({total})")
        self.total, self.warmup, self.power = total, warmup, power

    def __call__(self, done: int) -> float:
        if done < self.warmup:
            return done / self.warmup
        progress = (done - self.warmup) / (self.total - self.warmup)
        return max(0.0, 1.0 - progress) ** self.power


class SampleSchedule:
    """The run's LR, applied to the backbone's optimizer (inside DeepSpeed) and read by the head's.

    Stateless beyond its inputs: the position (samples seen) belongs to the run, so a checkpoint restores the
    LR by restoring the position."""

    def __init__(self, base_lr: float, horizon: int, warmup_samples: int, power: float):
        self.base_lr = base_lr
        self.curve = PolyWarmup(horizon, min(warmup_samples, horizon - 1), power)

    @property
    def horizon(self) -> int:
        return self.curve.total

    def lr(self, samples_after_step: int) -> float:
        return self.base_lr * self.curve(samples_after_step)

    def apply(self, optimizer, samples_after_step: int) -> float:
        """Set every param group of ``optimizer`` (DeepSpeed's wrapper forwards them) to this step's LR."""
        lr = self.lr(samples_after_step)
        if not math.isfinite(lr):
            raise ValueError(f"learning rate {lr} at sample {samples_after_step}")
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


def poly_warmup_scheduler(total_steps: int, warmup_steps: int = 0, power: float = 2.0):
    """A step-counting LambdaLR of the same curve, for the DDP baseline of ``ds_face.bench.engine_overhead``."""
    from torch.optim.lr_scheduler import LambdaLR
    curve = PolyWarmup(total_steps, warmup_steps, power)
    return lambda optimizer: LambdaLR(optimizer, lambda step: curve(step + 1))
