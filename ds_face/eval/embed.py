"""Embed a dataset with a trained backbone: ``[N, D]`` float32, L2-normalised, flip-summed as in ``ds_face.eval.verification``.

    python -m ds_face.eval.embed --model model.pt [--backbone r50] [--embedding 512] --arrow /data/ms1m-arrow --out emb.npy
    python -m ds_face.eval.embed --model model.pt --folder /data/my_faces --out emb.npy

Writes ``emb.npy`` (row i = sample i) and ``emb.labels.npy`` (int64). Order: for ``--arrow``, the manifest's
shard order and the rows within each shard (no shuffle); for ``--folder``, identity folders sorted by name
(labels 0..K-1) and the .jpg/.jpeg/.png files in each sorted by name (``ds_face.data.folder``, as
``data_prep.folder2arrow``). Both files are written under temporary names beside the output and renamed when
complete (labels first, then the embeddings), so ``emb.npy`` appears only when finished; an existing output is
kept unless ``--overwrite``. Bad input exits 2 with ``ds_face.eval.embed: error: ...`` naming the file (and shard row).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from ds_face.eval.inference import add_model_args, flip_embeddings, load_model


class EmbedError(ValueError):
    pass


def labels_path(out: Path) -> Path:
    return out.with_name(out.name[: -len(".npy")] + ".labels.npy")


def arrow_source(directory: str) -> tuple[int, Iterator[tuple[bytes, int, str]]]:
    """(number of samples, iterator of (image bytes, label, where)) over the shards in manifest order."""
    import pyarrow as pa

    from ds_face.data.shards import ShardError, check_shard_files, read_manifest
    try:
        manifest = read_manifest(directory)
        check_shard_files(manifest, directory)  # confined to the directory, present, of the manifest's size
    except ShardError as err:
        raise EmbedError(str(err)) from None
    paths = manifest.shard_paths(directory)

    def rows():
        for path in paths:
            try:
                with pa.OSFile(path, "rb") as source, pa.ipc.open_stream(source) as reader:
                    row = 0
                    for batch in reader:
                        images, labels = batch.column("image"), batch.column("label").to_numpy()
                        for i in range(batch.num_rows):
                            yield images[i].as_py(), int(labels[i]), f"{path}, row {row}"
                            row += 1
            except (pa.ArrowInvalid, OSError, KeyError) as err:
                raise EmbedError(f"{path}: cannot read the shard ({err})") from None
    return manifest.num_samples, rows()


def folder_source(directory: str) -> tuple[int, Iterator[tuple[bytes, int, str]]]:
    from ds_face.data.folder import FolderError, list_image_folder
    from ds_face.data.shards import MAX_IMAGE_BYTES
    try:
        folder = list_image_folder(directory)
    except FolderError as err:
        raise EmbedError(str(err)) from None

    def rows():
        for path, label in zip(folder.paths, folder.labels.tolist()):
            try:  # bounded: an image is at most MAX_IMAGE_BYTES (a shard's rule too); one more byte tells
                with open(path, "rb") as f:
                    data = f.read(MAX_IMAGE_BYTES + 1)
            except OSError as err:
                raise EmbedError(f"{path}: cannot read ({err.strerror})") from None
            if len(data) > MAX_IMAGE_BYTES:
                raise EmbedError(f"{path}: more than the {MAX_IMAGE_BYTES >> 20} MiB an image may take")
            yield data, label, path
    return len(folder.paths), rows()


def embed_rows(model, count: int, rows, out, batch_size: int, device=None,
               progress: bool = False) -> np.ndarray:
    """Write a .npy of [count, D] float32 into the open binary file ``out`` (rows in order, as they are
    computed) and return the labels. ``progress``: a progress bar on stderr."""
    import torch
    from tqdm import tqdm

    from ds_face.data.arrow import decode_rgb
    with torch.no_grad():
        dim = int(model(torch.zeros(2, 3, 112, 112, device=next(model.parameters()).device)).shape[1])
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                               "fortran_order": False, "shape": (count, dim)})
    labels = np.empty(count, np.int64)
    images = np.empty((batch_size, 112, 112, 3), np.uint8)
    filled = n = 0

    bar = tqdm(total=count, unit="img", desc="embed", disable=not progress, file=sys.stderr, mininterval=0.5)

    def flush(k):
        out.write(np.ascontiguousarray(flip_embeddings(model, images[:k], batch_size, device)[0], "<f4").tobytes())
        bar.update(k)

    for data, label, where in rows:
        if n >= count:
            raise EmbedError(f"{where}: more samples than the {count} expected")
        try:
            decode_rgb(data, (112, 112), out=images[filled])
        except Exception as err:
            raise EmbedError(f"{where}: cannot decode the image ({type(err).__name__}: {err}; "
                             f"the backbone takes 112x112 aligned faces)") from None
        labels[n] = label
        n, filled = n + 1, filled + 1
        if filled == batch_size:
            flush(filled)
            filled = 0
    if filled:
        flush(filled)
    bar.close()
    if n != count:
        raise EmbedError(f"found {n} samples, expected {count}")
    return labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ds_face.eval.embed", description=__doc__.splitlines()[0])
    add_model_args(parser)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--arrow", metavar="DIR", help="Arrow shards written by data_prep (manifest order)")
    src.add_argument("--folder", metavar="DIR", help="image folder, one sub-directory per identity")
    parser.add_argument("--out", required=True, metavar="EMB.npy", help="embeddings; labels go to EMB.labels.npy")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (shown on stderr only when stderr is a terminal)")
    args = parser.parse_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()

    from ds_face.config import ConfigError
    from ds_face.fileio import AtomicFile, WriteError
    out = Path(args.out)
    asides = []  # both files written aside (ds_face.fileio: fresh, exclusive, no link followed), then put in place
    try:
        if out.suffix != ".npy":
            raise EmbedError(f"--out {out}: must end with .npy")
        if args.batch_size < 1:
            raise EmbedError(f"--batch-size must be >= 1, got {args.batch_size}")
        if not out.parent.is_dir():
            raise EmbedError(f"--out {out}: directory {out.parent} does not exist")
        existing = [p for p in (out, labels_path(out)) if os.path.lexists(p)]  # a link, even dangling, too
        if existing and not args.overwrite:
            raise EmbedError(f"{existing[0]} exists; pass --overwrite to replace it (nothing was written)")
        count, rows = arrow_source(args.arrow) if args.arrow else folder_source(args.folder)
        model = load_model(args.model, args.backbone, args.embedding, args.device)
        asides.append(AtomicFile(labels_path(out)))
        asides.append(AtomicFile(out))
        labels = embed_rows(model, count, rows, asides[1].file, args.batch_size, args.device, progress)
        np.save(asides[0].file, labels)
        for aside in asides:  # the labels first: embeddings in place always have their labels
            aside.commit()
    except (EmbedError, ConfigError, WriteError) as err:
        print(f"ds_face.eval.embed: error: {err}", file=sys.stderr)
        return 2
    finally:
        for aside in asides:
            if not aside.done:
                aside.discard()
    print(f"{out}: {count} embeddings; labels in {labels_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
