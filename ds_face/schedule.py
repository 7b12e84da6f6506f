"""Learning-rate schedule: linear warm-up, then polynomial decay to zero (arcface_torch's PolyScheduler).

The step counted here is the *optimizer* step: DeepSpeed advances it once per
applied ``engine.step()`` at an accumulation boundary, never per micro-batch
(arcface_torch steps per micro-batch under accumulation, deepinsight/insightface#1996).
The head reads the engine's current LR, so both follow this one schedule.
"""
from __future__ import annotations

from torch.optim.lr_scheduler import LambdaLR


class PolyWarmup:
    """Multiplier of the base LR at optimizer step ``step`` (0-based)."""

    def __init__(self, total_steps: int, warmup_steps: int = 0, power: float = 2.0):
        if total_steps < 1 or not 0 <= warmup_steps < total_steps:
            raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) < total_steps ({total_steps})")
        self.total_steps, self.warmup_steps, self.power = total_steps, warmup_steps, power

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return max(0.0, 1.0 - progress) ** self.power


def poly_warmup_scheduler(total_steps: int, warmup_steps: int = 0, power: float = 2.0):
    """A callable DeepSpeed turns into the engine's LR scheduler: ``lr_scheduler=poly_warmup_scheduler(...)``."""
    multiplier = PolyWarmup(total_steps, warmup_steps, power)
    return lambda optimizer: LambdaLR(optimizer, multiplier)
