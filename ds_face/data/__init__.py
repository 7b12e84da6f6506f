"""Data loaders. Each yields per-rank micro-batches ``{"image", "label"}`` and has
``steps_per_epoch`` (optimizer steps, equal on every rank), ``set_epoch`` and
``state_dict``/``load_state_dict`` (the position within the epoch).

The loaders are imported on first use, so that `data_prep` can read the shard format
(`ds_face.data.shards`) without importing torch."""

__all__ = ["ArrowFaces", "SyntheticFaces"]


def __getattr__(name: str):
    if name == "ArrowFaces":
        from ds_face.data.arrow import ArrowFaces
        return ArrowFaces
    if name == "SyntheticFaces":
        from ds_face.data.synthetic import SyntheticFaces
        return SyntheticFaces
    raise AttributeError(f"module 'ds_face.data' has no attribute {name!r}")
