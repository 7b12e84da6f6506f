"""What a test reads after ``Trainer.fit``: every ``StepReport`` it handed to ``on_step``."""
import torch


class Recorder(list):
    """``trainer.fit(on_step=recorder)``: the reports, in order, with the views tests compare."""

    __call__ = list.append

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self]

    @property
    def lrs(self) -> list[tuple[int, float]]:
        """(samples seen after the step, its LR)."""
        return [(r.samples, r.lr) for r in self]

    @property
    def ledger(self) -> torch.Tensor:
        """[2, n]: the (epoch, row) of every sample this rank trained, in order."""
        return torch.cat([r.trained for r in self], dim=1) if self else torch.empty(2, 0, dtype=torch.int64)


def fit(trainer) -> Recorder:
    """``trainer.fit()``, recorded."""
    recorder = Recorder()
    trainer.fit(on_step=recorder)
    return recorder
