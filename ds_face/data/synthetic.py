"""Class-dependent synthetic faces, in the batch format every loader yields.

A batch is ``{"image": float32 [B, 3, 112, 112] in [-1, 1], "label": int64 [B]}``.
Each class has a fixed coarse 8x8 colour pattern (seeded by the class id, so it
is the same on every rank and needs no memory per class); an image is its
class's pattern, upsampled, plus fresh noise. A network can learn the classes,
so the loss visibly falls, which arcface_torch's constant synthetic image can't show.

Every rank yields exactly ``steps_per_epoch * accumulation`` micro-batches per
epoch, so no collective ever waits on a rank that ran out of data.
"""
from __future__ import annotations

import torch

IMAGE_SIZE = 112
_PATTERN = 8  # coarse grid: 112 / 8 = 14 pixels per cell


def class_pattern(label: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(label) * 7919 + 17)
    return torch.rand(3, _PATTERN, _PATTERN, generator=generator) * 2 - 1


class SyntheticFaces:
    def __init__(self, num_classes: int, num_samples: int, micro_batch: int, accumulation: int,
                 rank: int, world_size: int, seed: int = 0, noise: float = 0.5):
        self.num_classes, self.micro_batch, self.accumulation = num_classes, micro_batch, accumulation
        self.rank, self.world_size, self.seed, self.noise = rank, world_size, seed, noise
        self.steps_per_epoch = num_samples // (micro_batch * accumulation * world_size)
        self.epoch = 0
        self._position = 0  # micro-batches of this epoch already yielded

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._position = epoch, 0

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank."""
        return self.steps_per_epoch * self.accumulation

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "micro_batches": self._position, "world_size": self.world_size,
                "micro_batch": self.micro_batch}

    def load_state_dict(self, state: dict) -> None:
        """Same layout: continue exactly. Another world size or micro-batch: skip the same share of the epoch."""
        self.epoch = state["epoch"]
        done = state["micro_batches"] * state["micro_batch"] * state["world_size"]  # samples, all ranks
        position = done // (self.micro_batch * self.world_size)
        self._position = min(position - position % self.accumulation, len(self))

    def __iter__(self):
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank)
        for i in range(len(self)):
            labels = torch.randint(0, self.num_classes, (self.micro_batch,), generator=generator)
            noise = torch.randn((self.micro_batch, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator)
            if i < self._position:  # resumed mid-epoch: same random draws, batches already trained on
                continue
            patterns = torch.stack([class_pattern(label) for label in labels.tolist()])
            images = patterns.repeat_interleave(IMAGE_SIZE // _PATTERN, dim=2) \
                             .repeat_interleave(IMAGE_SIZE // _PATTERN, dim=3)
            self._position = i + 1
            yield {"image": (images + self.noise * noise).clamp_(-1.0, 1.0), "label": labels}
