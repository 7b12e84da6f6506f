"""Backbone registry: ``get_backbone("r50", embedding_size=512)``.

r18..r200 match arcface_torch's iresnet18..iresnet200 state_dicts exactly;
``r_tiny`` keeps the same module names but is small enough to train on a CPU.

``BACKBONES`` maps each name to its (blocks per stage, stage widths) and needs no torch, so that config
checks and ``--help`` stay fast; torch is imported when a model is built.
"""
from __future__ import annotations

WIDTHS = (64, 128, 256, 512)
BACKBONES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "r18": ((2, 2, 2, 2), WIDTHS),
    "r34": ((3, 4, 6, 3), WIDTHS),
    "r50": ((3, 4, 14, 3), WIDTHS),
    "r100": ((3, 13, 30, 3), WIDTHS),
    "r200": ((6, 26, 60, 6), WIDTHS),
    "r_tiny": ((1, 1, 1, 1), (8, 16, 32, 64)),
}


def get_backbone(
    name: str,
    embedding_size: int = 512,
    dropout: float = 0.0,
    gradient_checkpointing: bool = False,
):
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    from .iresnet import IResNet
    layers, widths = BACKBONES[name]
    return IResNet(list(layers), widths=widths, embedding_size=embedding_size, dropout=dropout,
                   gradient_checkpointing=gradient_checkpointing)


def __getattr__(name: str):
    if name == "IResNet":  # imported on first use: it needs torch
        from .iresnet import IResNet
        return IResNet
    raise AttributeError(f"module 'ds_face.backbones' has no attribute {name!r}")


__all__ = ["BACKBONES", "IResNet", "get_backbone"]
