"""Data: sources of rows (Arrow shards, synthetic), the run's sample order, and the per-rank loader.

    ds_face.data.options  what the data section may name (sources, on_corrupt): the config checks against these
    ds_face.data.seeds    every value a run draws from its seed (order, flips, synthetic rows, negatives)
    ds_face.data.shards   the shard format data_prep writes (no torch needed)
    ds_face.data.folder   an image folder (one sub-directory per identity) listed: embed and folder2arrow
    ds_face.data.order    run position -> (epoch, dataset row): one global order, whatever the world size
    ds_face.data.arrow    ArrowFaces: rows from memory-mapped shards, decoded and flipped
    ds_face.data.synthetic  SyntheticFaces: rows from a formula
    ds_face.data.loader   Loader: this rank's micro-batches from a position of the run

The loaders are imported on first use, so that `data_prep` can read the shard format without importing torch."""

__all__ = ["ArrowFaces", "SyntheticFaces", "Loader"]


def __getattr__(name: str):
    if name == "ArrowFaces":
        from ds_face.data.arrow import ArrowFaces
        return ArrowFaces
    if name == "SyntheticFaces":
        from ds_face.data.synthetic import SyntheticFaces
        return SyntheticFaces
    if name == "Loader":
        from ds_face.data.loader import Loader
        return Loader
    raise AttributeError(f"module 'ds_face.data' has no attribute {name!r}")
