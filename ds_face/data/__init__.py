"""Data loaders. Each yields per-rank micro-batches ``{"image", "label"}`` and has
``steps_per_epoch`` (optimizer steps, equal on every rank) and ``set_epoch``."""
from ds_face.data.arrow import ArrowFaces
from ds_face.data.synthetic import SyntheticFaces

__all__ = ["ArrowFaces", "SyntheticFaces"]
