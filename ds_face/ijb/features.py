"""IJB image features: each loose crop read, size-checked from its header, decoded and aligned (in worker
processes, a bounded number of images in flight), embedded with its flip and summed; and those features saved
and read back, tied to the image list they were computed for."""
from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import numpy as np

from ds_face.ijb.align import ALIGNED_SIZE, align
from ds_face.ijb.meta import IJBError, IJBMeta

# The largest loose crop decoded, in pixels (6000x6000: 108 MB as RGB), read from the header first.
MAX_PIXELS = 6000 * 6000
CHUNK = 32  # images per task sent to a decode worker
FEATURES_VERSION = 1


def load_aligned(path: Path, landmarks: np.ndarray, where: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read, check the size from the header, decode, align. ``where``: 'file line N' for errors."""
    from PIL import UnidentifiedImageError

    from ds_face.images import ImageTooLarge, decode_bounded
    try:
        data = path.read_bytes()
    except OSError as err:
        raise IJBError(f"{where}: image {path}: cannot read ({err.strerror})") from None
    try:
        pixels = decode_bounded(data, max_pixels)
    except ImageTooLarge as err:
        raise IJBError(f"{where}: image {path} {err} (--max-pixels); refused without decoding it") from None
    except Exception as err:  # noqa: BLE001 - not an image, truncated, PIL's own bomb refusal
        why = ("not an image format PIL or libjpeg-turbo can read" if isinstance(err, UnidentifiedImageError)
               else f"{type(err).__name__}: {err}")
        raise IJBError(f"{where}: image {path} cannot be decoded ({why})") from None
    try:
        return align(pixels, landmarks)
    except (ValueError, np.linalg.LinAlgError) as err:
        raise IJBError(f"{where}: cannot align image {path} ({err})") from None


def _align_chunk(task) -> tuple[int, np.ndarray]:
    """Worker task: (start, [(name, landmarks)], crop dir, landmark file, max_pixels) -> (start, uint8 images)."""
    start, items, crop, lmk_file, max_pixels = task
    out = np.empty((len(items), ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8)
    for k, (name, marks) in enumerate(items):
        out[k] = load_aligned(Path(crop) / name, marks, f"{lmk_file} line {start + k + 1}", max_pixels)
    return start, out


def aligned_chunks(meta: IJBMeta, workers: int, max_pixels: int = MAX_PIXELS, chunk: int = CHUNK,
                   start: int = 0, stop: int | None = None):
    """Yield (start, uint8 [k, 112, 112, 3]) in image order, ``workers`` processes decoding ahead (0: in this
    process); at most 2 x workers chunks are in flight, so memory stays bounded whatever the consumer's pace."""
    stop = meta.images if stop is None else stop
    crop, lmk = str(meta.root / "loose_crop"), str(meta.files["landmarks"])
    tasks = ((a, list(zip(meta.names[a:min(a + chunk, stop)], meta.landmarks[a:min(a + chunk, stop)])),
              crop, lmk, max_pixels) for a in range(start, stop, chunk))
    if workers <= 0:
        for task in tasks:
            yield _align_chunk(task)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    # spawn: the parent may hold CUDA and torch threads, which a fork must not inherit. An executor, not a
    # multiprocessing.Pool: a worker that dies (killed, out of memory) breaks it with an error instead of
    # leaving its task unanswered for ever.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    pending: deque = deque()
    try:
        for task in tasks:
            pending.append(pool.submit(_align_chunk, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as err:
        raise IJBError(f"a decode worker process died ({err}); was it killed, e.g. out of memory? "
                       f"--workers 0 decodes in this process") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # at most the chunks already running finish


def image_features(meta: IJBMeta, model, batch_size: int = 128, device=None, workers: int = 0,
                   max_pixels: int = MAX_PIXELS, progress: bool = False, deadline: float | None = None,
                   limit: int | None = None) -> np.ndarray:
    """float32 [N, D]: each image's embedding plus its flipped image's, un-normalised, before the detector score.

    ``deadline`` (time.monotonic()) raises ds_face.eval.inference.EvalTimeout between batches."""
    from tqdm import tqdm

    from ds_face.eval.inference import embed_flip
    count = meta.images if limit is None else min(limit, meta.images)
    feats = None
    batch = np.empty((batch_size, ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8)
    filled = done = 0

    def flush():
        nonlocal feats, done, filled
        plain, flipped = embed_flip(model, batch[:filled], batch_size, device, deadline)
        if feats is None:
            feats = np.empty((count, plain.shape[1]), np.float32)
        feats[done:done + filled] = plain + flipped
        done, filled = done + filled, 0

    with tqdm(total=count, unit="img", desc=f"{meta.target} embed", disable=not progress, smoothing=0.05) as bar:
        for _, aligned in aligned_chunks(meta, workers, max_pixels, stop=count):
            k = 0
            while k < len(aligned):
                take = min(len(aligned) - k, batch_size - filled)
                batch[filled:filled + take] = aligned[k:k + take]
                filled, k = filled + take, k + take
                if filled == batch_size:
                    flush()
            bar.update(len(aligned))
        if filled:
            flush()
    bad = np.flatnonzero(~np.isfinite(feats).all(1))
    if len(bad):
        raise IJBError(f"{meta.files['landmarks']} line {bad[0] + 1}: the model's embedding of image "
                       f"{meta.names[bad[0]]} is not finite ({len(bad)} images in all)")
    return feats


def save_features(path: str | os.PathLike, feats: np.ndarray, meta: IJBMeta, info: dict) -> None:
    """One uncompressed .npz, written aside and renamed when complete."""
    from ds_face.fileio import write_atomic

    def write(f):
        np.savez(f, features=feats, digest=np.array(meta.names_digest()), target=np.array(meta.target),
                 version=np.array(FEATURES_VERSION), model=np.array(str(info.get("model", ""))),
                 backbone=np.array(str(info.get("backbone", ""))))
    write_atomic(path, write)


def load_features(path: str | os.PathLike, meta: IJBMeta) -> np.ndarray:
    """The features of a ``save_features`` file, checked against ``meta`` (same images, same landmarks)."""
    import zipfile
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:  # arrays only: nothing in the file is unpickled
            missing = {"features", "digest", "version"} - set(z.files)
            if missing:
                raise IJBError(f"{path}: not an IJB features file (no {', '.join(sorted(missing))}); written by "
                               f"python -m ds_face.eval ijb --features")
            version, digest, feats = int(z["version"]), str(z["digest"]), z["features"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        if isinstance(err, IJBError):
            raise
        raise IJBError(f"{path}: not a readable features file ({type(err).__name__}: {err})") from None
    if version != FEATURES_VERSION:
        raise IJBError(f"{path}: features format version {version}, this ds_face reads {FEATURES_VERSION}")
    if feats.ndim != 2 or feats.dtype != np.float32 or len(feats) != meta.images:
        raise IJBError(f"{path}: features of shape {list(feats.shape)} ({feats.dtype}), expected "
                       f"[{meta.images}, D] float32 for the {meta.images} images of {meta.files['landmarks']}")
    if digest != meta.names_digest():
        raise IJBError(f"{path}: computed for another image list (names or landmarks differ from "
                       f"{meta.files['landmarks']}); recompute with --model ... --overwrite")
    if not np.isfinite(feats).all():
        raise IJBError(f"{path}: holds non-finite features")
    return feats
