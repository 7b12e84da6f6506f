"""Backbone registry: ``get_backbone("r50", embedding_size=512)``.

r18..r200 match arcface_torch's iresnet18..iresnet200 state_dicts exactly;
``r_tiny`` keeps the same module names but is small enough to train on a CPU.
"""
from functools import partial
from typing import Callable, Dict

from torch import nn

from .iresnet import IResNet

BACKBONES: Dict[str, Callable[..., nn.Module]] = {
    "r18": partial(IResNet, [2, 2, 2, 2]),
    "r34": partial(IResNet, [3, 4, 6, 3]),
    "r50": partial(IResNet, [3, 4, 14, 3]),
    "r100": partial(IResNet, [3, 13, 30, 3]),
    "r200": partial(IResNet, [6, 26, 60, 6]),
    "r_tiny": partial(IResNet, [1, 1, 1, 1], widths=(8, 16, 32, 64)),
}


def get_backbone(
    name: str,
    embedding_size: int = 512,
    dropout: float = 0.0,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    return BACKBONES[name](
        embedding_size=embedding_size,
        dropout=dropout,
        gradient_checkpointing=gradient_checkpointing,
    )


__all__ = ["BACKBONES", "IResNet", "get_backbone"]
