"""Class-dependent synthetic faces: a dataset of ``num_samples`` rows that exists only as a formula.

Row r has a fixed label (seeded by the run's seed and r) and an image: its class's coarse 8x8 colour
pattern (seeded by the class id, the same on every rank, no memory per class), upsampled, plus noise fixed
by (seed, epoch, row). A network can learn the classes, so the loss visibly falls, which arcface_torch's
constant synthetic image can't show. Rows are read in the run's order like Arrow rows (`ds_face.data.order`),
so resumes and resizes see exactly the samples an uninterrupted run would.
"""
from __future__ import annotations

import numpy as np
import torch

from ds_face.data.seeds import noise_seed, pattern_seed, synthetic_labels

IMAGE_SIZE = 112
_PATTERN = 8  # coarse grid: 112 / 8 = 14 pixels per cell
_SHARD_ROWS = 10_000  # synthetic "shards": units of the epoch order, as for Arrow data


def class_pattern(label: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(pattern_seed(label))
    return torch.rand(3, _PATTERN, _PATTERN, generator=generator) * 2 - 1


class SyntheticFaces:
    def __init__(self, num_classes: int, num_samples: int, seed: int = 0, noise: float = 0.5):
        self.num_classes, self.num_samples, self.seed, self.noise = num_classes, num_samples, seed, noise
        full, rest = divmod(num_samples, _SHARD_ROWS)
        self.shard_rows = [_SHARD_ROWS] * full + ([rest] if rest else [])

    def identity(self) -> dict:
        return {"source": "synthetic", "num_samples": self.num_samples, "num_classes": self.num_classes}

    def label(self, rows: np.ndarray) -> np.ndarray:
        return synthetic_labels(self.seed, rows, self.num_classes)

    def make(self, epochs: np.ndarray, rows: np.ndarray) -> dict:
        labels = self.label(rows)
        patterns = torch.stack([class_pattern(label) for label in labels.tolist()])
        images = patterns.repeat_interleave(IMAGE_SIZE // _PATTERN, dim=2) \
                         .repeat_interleave(IMAGE_SIZE // _PATTERN, dim=3)
        noise = torch.empty_like(images)
        generator = torch.Generator()
        for i, (epoch, row) in enumerate(zip(epochs.tolist(), rows.tolist())):
            generator.manual_seed(noise_seed(self.seed, epoch, row))
            noise[i].normal_(generator=generator)
        pixels = (images + self.noise * noise).clamp_(-1.0, 1.0).add_(1.0).mul_(127.5).round_()
        return {"image": pixels.to(torch.uint8).permute(0, 2, 3, 1).contiguous(),  # uint8 NHWC, like Arrow rows
                "label": labels, "sample": rows, "corrupt": 0}
