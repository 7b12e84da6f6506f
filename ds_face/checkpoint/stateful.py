"""Small stateful parts a checkpoint carries besides the engine and the head: the run's position, the
process's random streams, and a module's buffers. Each has ``state_dict()`` / ``load_state_dict()``."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Position:
    """Where the run is: optimizer steps taken and samples seen (the position in the run's sample stream,
    `ds_face.data.order`). The LR, the data and the head's sampling all follow from ``samples``."""
    step: int = 0
    samples: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        step, samples = state["step"], state["samples"]
        if not (isinstance(step, int) and isinstance(samples, int) and step >= 0 and samples >= 0):
            raise ValueError(f"position must be two non-negative integers, got step {step!r}, samples {samples!r}")
        self.step, self.samples = step, samples


class ProcessRNG:
    """torch, accelerator, Python and numpy random streams of this process (dropout, anything user code draws)."""

    def state_dict(self) -> dict:
        from deepspeed.accelerator import get_accelerator
        np_state = np.random.get_state()
        return {"torch": torch.get_rng_state(), "accelerator": get_accelerator().get_rng_state(),
                "python": random.getstate(),
                "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]}

    def load_state_dict(self, state: dict) -> None:
        from deepspeed.accelerator import get_accelerator
        torch.set_rng_state(state["torch"])
        get_accelerator().set_rng_state(state["accelerator"])
        random.setstate(_tuples(state["python"]))
        np.random.set_state((state["numpy"][0], state["numpy"][1].numpy(), *state["numpy"][2:]))


def _tuples(value):
    """random.getstate() comes back from torch.load with lists where it had tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class ModuleBuffers:
    """A module's buffers (BatchNorm running statistics): they differ per rank, since nothing syncs them, and
    DeepSpeed saves rank 0's module only."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def state_dict(self) -> dict:
        return {name: buf.detach().cpu() for name, buf in self.module.named_buffers()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for name, buf in self.module.named_buffers():
                buf.copy_(state[name])
