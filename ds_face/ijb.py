"""IJB-B / IJB-C 1:1 template verification, as InsightFace releases the sets and arcface_torch's
``eval_ijbc.py`` scores them.

    python -m ds_face.eval ijb --root /data/IJB_release/IJBC --target IJBC --model model.pt [--backbone r100]
        [--batch-size 256] [--device cuda] [--workers 8] [--features feats.npz] [--json out.json] [--plot roc.png]

**Layout** (``<t>`` = the target in lower case, ``ijbc`` or ``ijbb``, as in the release):
``<root>/loose_crop/<image>``; ``<root>/meta/<t>_name_5pts_score.txt`` (image, 5 landmarks x y, detector score),
``<root>/meta/<t>_face_tid_mid.txt`` (image, template id, media id; the same images in the same order),
``<root>/meta/<t>_template_pair_label.txt`` (template 1, template 2, label 1 = same person).

**Protocol** (arcface_torch's default test mode: flip-sum F2, norm kept N1, detector score D1):

* each image is warped to 112x112 by the least-squares similarity transform (Umeyama) from its 5 landmarks
  to the standard ArcFace template, bilinear, black border (cv2.warpAffine's pixel convention: pixel centres
  at integer coordinates), RGB;
* embedded with and without a horizontal flip (input ``(pixel/255 - 0.5)/0.5``), the two embeddings summed,
  *not* normalised, multiplied by the detector score;
* within a template, the images of one media are averaged; the media features are summed into the template
  feature, which is L2-normalised; a pair's score is the cosine of its two templates (float32);
* the ROC is sklearn's ``roc_curve(label, score)`` (intermediate collinear points dropped, as its default);
  TAR at FAR f is the TPR of **the ROC point whose FPR is nearest f** (ties: the larger FPR, then the larger
  TPR), exactly arcface_torch's rule; the FPR of that point is reported beside it. AUC: trapezoids.

Scoring is vectorised and memory-bounded: pairs are put in (lower, higher) template order and scored by
blocks of rows of the template Gram matrix (``FEATURES[a:b] @ FEATURES[a:].T``, at most ``GRAM_BYTES``),
seconds for IJB-C's 15.7M pairs. Decoding and alignment run in ``--workers`` processes with a bounded
number of images in flight.

**Bad input** stops with ``IJBError`` naming the file and line: a missing meta file, directory or image, a
line with the wrong number of fields or a non-number, the two image lists disagreeing, a template in the pair
list that no image has, a label other than 0/1, an image that does not decode or is larger than
``max_pixels`` (read from its header before decoding), an image name that leaves ``loose_crop``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ds_face.ijb_layout import check_layout, meta_files  # noqa: F401 - also part of this module's API
from ds_face.images import decode  # noqa: F401 - ds_face.bench.ijb times the decode alone

# The ArcFace 112x112 five-point template (left eye, right eye, nose tip, left and right mouth corners):
# InsightFace's 96x112 template shifted 8 px right.
ARCFACE_TEMPLATE = np.array([[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366],
                             [33.5493, 92.3655], [62.7299, 92.2041]]) + np.array([8.0, 0.0])
ALIGNED_SIZE = 112
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# The largest loose crop decoded, in pixels (6000x6000: 108 MB as RGB), read from the header first.
MAX_PIXELS = 6000 * 6000
GRAM_BYTES = 128 << 20  # a scoring block of the template Gram matrix
CHUNK = 32  # images per task sent to a decode worker
RULE = ("TAR at the ROC point whose FPR is nearest each target FAR (arcface_torch eval_ijbc.py's rule; "
        "ties: the larger FPR, then the larger TPR)")
FEATURES_VERSION = 1


class IJBError(ValueError):
    """IJB input that cannot be used; the message names the file (and the line)."""


# -- reading the meta files -----------------------------------------------------------------------------

@dataclass
class IJBMeta:
    """The three meta files, parsed and cross-checked; row i of the image arrays = line i+1 of both image lists."""
    root: Path
    target: str
    files: dict[str, Path]
    names: list[str]
    landmarks: np.ndarray  # [N, 5, 2] float32
    scores: np.ndarray  # [N] float32 detector scores
    templates: np.ndarray  # [N] int64
    medias: np.ndarray  # [N] int64
    pair_t1: np.ndarray  # [P] int64 template ids
    pair_t2: np.ndarray
    labels: np.ndarray  # [P] int8, 1 = same person
    pair_lines: np.ndarray | None = field(default=None, repr=False)  # line of each pair row where not row+1

    @property
    def images(self) -> int:
        return len(self.names)

    def names_digest(self) -> str:
        """sha256 of the image names (one a line) and the landmarks: ties saved features to this image list."""
        h = hashlib.sha256("\n".join(self.names).encode())
        h.update(np.ascontiguousarray(self.landmarks, dtype="<f4").tobytes())
        return h.hexdigest()

    def pair_line(self, row: int) -> int:
        return int(self.pair_lines[row]) if self.pair_lines is not None else row + 1


def _lines(path: Path):
    """(line number, fields) of the non-blank lines of a text meta file."""
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise IJBError(f"{path} line {n}: not UTF-8 text") from None
                fields = line.split()
                if fields:
                    yield n, fields
    except FileNotFoundError:
        raise IJBError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise IJBError(f"{path}: is a directory, expected a text file") from None


def _number(value: str, path: Path, n: int, what: str, kind=float):
    try:
        x = kind(value)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise IJBError(f"{path} line {n}: {what} is {value!r}, not {expected}") from None
    if kind is float and not np.isfinite(x):
        raise IJBError(f"{path} line {n}: {what} is {value!r}, not a finite number")
    return x


def _check_name(name: str, path: Path, n: int) -> None:
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or "\\" in name or not parts or ":" in parts[0]:
        raise IJBError(f"{path} line {n}: image name {name!r} must be a relative path inside loose_crop/")


def read_landmarks(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    names, marks, scores = [], [], []
    for n, fields in _lines(path):
        if len(fields) != 12:
            raise IJBError(f"{path} line {n}: {len(fields)} fields, expected 12 (image name, 5 landmarks as "
                           f"x y pairs, detector score)")
        _check_name(fields[0], path, n)
        names.append(fields[0])
        marks.append([_number(v, path, n, f"field {k + 2}") for k, v in enumerate(fields[1:11])])
        scores.append(_number(fields[11], path, n, "the detector score (field 12)"))
    if not names:
        raise IJBError(f"{path}: no images listed")
    return names, np.asarray(marks, np.float32).reshape(-1, 5, 2), np.asarray(scores, np.float32)


def read_template_media(path: Path, names: list[str], names_path: Path) -> tuple[np.ndarray, np.ndarray]:
    templates, medias = np.empty(len(names), np.int64), np.empty(len(names), np.int64)
    i = 0
    for n, fields in _lines(path):
        if len(fields) != 3:
            raise IJBError(f"{path} line {n}: {len(fields)} fields, expected 3 (image name, template id, media id)")
        if i >= len(names):
            raise IJBError(f"{path} line {n}: more images than the {len(names)} of {names_path}")
        if fields[0] != names[i]:
            raise IJBError(f"{path} line {n}: names {fields[0]!r}, but image {i + 1} of {names_path} is "
                           f"{names[i]!r} (the two files list the same images in the same order)")
        templates[i] = _number(fields[1], path, n, "the template id", int)
        medias[i] = _number(fields[2], path, n, "the media id", int)
        i += 1
    if i != len(names):
        raise IJBError(f"{path}: {i} images, but {names_path} lists {len(names)}")
    return templates, medias


def _pairs_slow(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Line by line: the first bad line named (used when the fast parse fails), or (rows, line numbers)."""
    rows, lines = [], []
    for n, fields in _lines(path):
        if len(fields) != 3:
            raise IJBError(f"{path} line {n}: {len(fields)} fields, expected 3 (template 1, template 2, label)")
        rows.append([_number(v, path, n, what, int) for v, what in
                     zip(fields, ("template 1", "template 2", "the label"))])
        lines.append(n)
    return np.asarray(rows, np.int64).reshape(-1, 3), np.asarray(lines, np.int64)


def read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """[P, 3] int64 (t1, t2, label) and, where blank lines make line != row + 1, each row's line number.

    numpy's C parser reads IJB-C's 15.7M lines in about a second; on any problem the file is re-read line by
    line so that the error names the first bad line."""
    if not path.is_file():
        raise IJBError(f"{path}: no such file")
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": refused below, by name
            rows = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except (ValueError, UnicodeDecodeError):
        rows = None
    lines = None
    if rows is None or rows.shape[1] != 3 or rows.shape[0] != _count_lines(path):
        rows, lines = _pairs_slow(path)
        if np.array_equal(lines, np.arange(1, len(lines) + 1)):
            lines = None
    if len(rows) == 0:
        raise IJBError(f"{path}: no pairs listed")
    return rows, lines


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def read_meta(root: str | os.PathLike, target: str, check_images: bool = True) -> IJBMeta:
    """Parse and cross-check the three meta files; with ``check_images``, every listed image must exist."""
    root = Path(root)
    problems = check_layout(root, target)
    if problems:
        raise IJBError(problems[0])
    files = meta_files(root, target)
    names, landmarks, scores = read_landmarks(files["landmarks"])
    templates, medias = read_template_media(files["templates"], names, files["landmarks"])
    rows, lines = read_pairs(files["pairs"])
    meta = IJBMeta(root, target, files, names, landmarks, scores, templates, medias,
                   rows[:, 0].copy(), rows[:, 1].copy(), rows[:, 2].astype(np.int8), lines)
    bad = np.flatnonzero((rows[:, 2] != 0) & (rows[:, 2] != 1))
    if len(bad):
        raise IJBError(f"{files['pairs']} line {meta.pair_line(bad[0])}: label {rows[bad[0], 2]}, expected 1 "
                       f"(same person) or 0")
    known = np.unique(templates)
    for column, ids in ((1, meta.pair_t1), (2, meta.pair_t2)):
        missing = np.flatnonzero(~np.isin(ids, known))
        if len(missing):
            k = missing[0]
            raise IJBError(f"{files['pairs']} line {meta.pair_line(k)}: template {ids[k]} (column {column}) has "
                           f"no image in {files['templates']}")
    if not meta.labels.any() or meta.labels.all():
        raise IJBError(f"{files['pairs']}: {'no' if not meta.labels.any() else 'only'} genuine (label 1) pairs; "
                       f"the ROC needs both genuine and impostor pairs")
    if check_images:
        check_images_exist(meta)
    return meta


def check_images_exist(meta: IJBMeta) -> None:
    crop = meta.root / "loose_crop"
    present = {entry.name for entry in os.scandir(crop)}
    for i, name in enumerate(meta.names):
        if (name in present) if "/" not in name else (crop / name).is_file():
            continue
        raise IJBError(f"{meta.files['landmarks']} line {i + 1}: image {crop / name} not found")


# -- alignment --------------------------------------------------------------------------------------------

def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 similarity transform (scale, rotation, translation; no reflection) minimising
    sum ||dst_i - (s R src_i + t)||^2: Umeyama (1991), "Least-squares estimation of transformation parameters
    between two point patterns", eqs. 34-43. Raises ValueError for degenerate points (all equal)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    var_s = (sc ** 2).sum() / len(src)
    if not var_s > 1e-12:
        raise ValueError("the landmarks are all the same point")
    cov = dc.T @ sc / len(src)
    u, sing, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal map is a reflection: take the best rotation
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = float((sing * d).sum() / var_s)
    return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """cv2.warpAffine(image, matrix, (size, size)) semantics with PIL: ``matrix`` maps input pixel coordinates
    (pixel centres at integers) to output ones; bilinear; outside the image: black."""
    from PIL import Image
    a, b = matrix[:, :2], matrix[:, 2]
    ai = np.linalg.inv(a)
    # PIL samples output pixel (x, y) at (x + 0.5, y + 0.5) and puts input pixel centres at +0.5 too:
    # input_pil = ai @ (q - 0.5) - ai @ b + 0.5 for an output point q in PIL coordinates.
    c = -ai @ b + 0.5 - ai @ np.array([0.5, 0.5])
    data = (ai[0, 0], ai[0, 1], c[0], ai[1, 0], ai[1, 1], c[1])
    out = Image.fromarray(image).transform((size, size), Image.AFFINE, data, resample=Image.BILINEAR,
                                           fillcolor=(0, 0, 0))
    return np.asarray(out)


def align(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """uint8 [112, 112, 3]: ``image`` warped so that its 5 landmarks land on ARCFACE_TEMPLATE (least squares)."""
    return warp_affine(image, umeyama(landmarks, ARCFACE_TEMPLATE))


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

    ``deadline`` (time.monotonic()) raises ds_face.inference.EvalTimeout between batches."""
    from tqdm import tqdm

    from ds_face.inference import embed_flip
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


# -- saved features -----------------------------------------------------------------------------------------

def save_features(path: str | os.PathLike, feats: np.ndarray, meta: IJBMeta, info: dict) -> None:
    """One uncompressed .npz, written aside and renamed when complete."""
    from ds_face.fileio import write_atomic

    def write(tmp: Path):
        with open(tmp, "wb") as f:
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


# -- the protocol --------------------------------------------------------------------------------------------

def template_features(feats: np.ndarray, scores: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique template ids [T], L2-normalised template features [T, D] float32).

    Image feature x detector score; mean over the images of each (template, media); sum over a template's
    media; L2-normalise (a zero vector stays zero). The mean-then-sum is one weighted sum per template
    (weight = detector score / images in the image's media), in float64, over about ``block`` sorted images
    at a time (blocks end on template boundaries; numpy's ``sum(0)`` per template slice: ~20x faster here
    than ``add.reduceat`` along axis 0)."""
    order = np.lexsort((medias, templates))
    t_sorted, m_sorted = templates[order], medias[order]
    new_media = np.r_[True, (t_sorted[1:] != t_sorted[:-1]) | (m_sorted[1:] != m_sorted[:-1])]
    media_id = np.cumsum(new_media) - 1
    weight = scores[order].astype(np.float64) / np.bincount(media_id)[media_id]
    t_starts = np.flatnonzero(np.r_[True, t_sorted[1:] != t_sorted[:-1]])
    unique_t = t_sorted[t_starts]
    t_ends = np.r_[t_starts[1:], len(order)]
    out = np.empty((len(unique_t), feats.shape[1]), np.float64)
    first, n = 0, len(unique_t)
    while first < n:
        a = int(t_starts[first])
        last = max(first + 1, int(np.searchsorted(t_starts, a + block)))  # templates [first, last) in this block
        b = int(t_ends[last - 1])
        x = feats[order[a:b]] * weight[a:b, None]
        for t in range(first, last):
            out[t] = x[t_starts[t] - a:t_ends[t] - a].sum(0)
        first = last
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return unique_t, (out / np.maximum(norm, 1e-12)).astype(np.float32)


def template_index(unique_t: np.ndarray, ids: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(unique_t, ids)
    if (idx >= len(unique_t)).any() or (unique_t[np.minimum(idx, len(unique_t) - 1)] != ids).any():
        raise ValueError("a pair names a template with no features")
    return idx


def pair_scores(tfeats: np.ndarray, i1: np.ndarray, i2: np.ndarray, gram_bytes: int = GRAM_BYTES) -> np.ndarray:
    """float32 cosines tfeats[i1] . tfeats[i2] of L2-normalised template features, for millions of pairs.

    Pairs are ordered by their lower template index; rows [a, b) of the Gram matrix against templates >= a
    are computed by BLAS in blocks of at most ``gram_bytes`` and the pairs whose lower index is in [a, b)
    read from it. Memory: the block plus a few int arrays of the pair count."""
    t = len(tfeats)
    # the smallest index type: numpy sorts 16-bit keys by radix (IJB-C's 23k templates: ~10x faster)
    kind = np.uint16 if t <= np.iinfo(np.uint16).max else np.int32 if t <= np.iinfo(np.int32).max else np.int64
    lo, hi = np.minimum(i1, i2).astype(kind), np.maximum(i1, i2).astype(kind)
    order = np.argsort(lo, kind="stable")
    lo_s, hi_s = lo[order], hi[order]
    out = np.empty(len(i1), np.float32)
    rows = max(1, min(t, gram_bytes // (4 * max(t, 1))))
    bounds = np.searchsorted(lo_s, np.arange(0, t + rows, rows))
    for k, a in enumerate(range(0, t, rows)):
        p, q = bounds[k], bounds[k + 1]
        if p == q:
            continue
        gram = tfeats[a:a + rows] @ tfeats[a:].T  # [rows, t - a]
        out[order[p:q]] = gram[lo_s[p:q].astype(np.int64) - a, hi_s[p:q].astype(np.int64) - a]
    return out


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) as sklearn's ``roc_curve(labels, scores)`` (drop_intermediate=True): one point per
    distinct score (descending), collinear interior points dropped, (0, 0) prepended with threshold inf."""
    order = np.argsort(scores)[::-1]
    s = scores[order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # the last index of each distinct score
    tps = np.cumsum(labels[order], dtype=np.int64)[ends]
    fps = 1 + ends - tps
    thresholds = s[ends].astype(np.float64)
    if len(fps) > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray, fars=FARS) -> dict[str, dict]:
    """{'1e-04': {'tar', 'fpr', 'threshold'}}: the ROC point whose FPR is nearest each target (first in
    descending-FPR order on a tie: the larger FPR, and at equal FPR the larger TPR: arcface_torch's flipud + min)."""
    f, t, th = fpr[::-1], tpr[::-1], thresholds[::-1]
    out = {}
    for far in fars:
        k = int(np.argmin(np.abs(f - far)))
        out[f"{far:.0e}"] = {"tar": float(t[k]), "fpr": float(f[k]), "threshold": float(th[k])}
    return out


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def evaluate_features(meta: IJBMeta, feats: np.ndarray, fars=FARS) -> tuple[dict, dict]:
    """(report, curve) from image features [N, D]: the protocol after the backbone. ``curve``: fpr, tpr, thresholds."""
    seconds = {}
    started = time.perf_counter()
    unique_t, tfeats = template_features(feats, meta.scores, meta.templates, meta.medias)
    seconds["templates"] = time.perf_counter() - started
    started = time.perf_counter()
    scores = pair_scores(tfeats, template_index(unique_t, meta.pair_t1), template_index(unique_t, meta.pair_t2))
    seconds["scoring"] = time.perf_counter() - started
    started = time.perf_counter()
    fpr, tpr, thresholds = roc_curve(meta.labels, scores)
    seconds["roc"] = time.perf_counter() - started
    genuine = int(meta.labels.sum())
    report = {"target": meta.target, "root": str(meta.root), "images": meta.images, "templates": int(len(unique_t)),
              "pairs": int(len(scores)), "genuine": genuine, "impostor": int(len(scores) - genuine),
              "embedding": int(feats.shape[1]), "tar_at_far": tar_at_far(fpr, tpr, thresholds, fars),
              "auc": auc(fpr, tpr), "rule": RULE, "seconds": seconds}
    return report, {"fpr": fpr, "tpr": tpr, "thresholds": thresholds, "scores": scores}


# -- output ----------------------------------------------------------------------------------------------------

def format_table(reports: list[dict]) -> str:
    keys = list(reports[0]["tar_at_far"])
    lines = ["| set | templates | pairs | " + " | ".join(f"TAR@FAR={k}" for k in keys) + " | AUC |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in keys) + " | ---: |"]
    for r in reports:
        cells = " | ".join(f"{100 * r['tar_at_far'][k]['tar']:.2f}" for k in keys)
        lines.append(f"| {r['target']} | {r['templates']} | {r['pairs']} | {cells} | {100 * r['auc']:.2f} |")
    return "\n".join(lines) + f"\n\nTAR and AUC in %; {RULE}."


def plot_roc(path: str | os.PathLike, curve: dict, report: dict, label: str = "") -> None:
    """ROC on a log-FPR axis (1e-6 .. 1), the TAR@FAR points marked; written aside and renamed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ds_face.fileio import write_atomic
    fpr, tpr = curve["fpr"], curve["tpr"]
    keep = fpr > 0
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    ax.plot(fpr[keep], tpr[keep], lw=1.2, label=f"{label or report['target']} (AUC = {100 * report['auc']:.2f} %)")
    points = report["tar_at_far"].values()
    ax.scatter([p["fpr"] for p in points], [p["tar"] for p in points], s=14, zorder=3, label="TAR@FAR points")
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1.0)
    low = min([p["tar"] for p in points] + [0.3])
    ax.set_ylim(max(0.0, np.floor(low * 10) / 10), 1.0)
    ax.grid(linestyle="--", linewidth=0.6)
    ax.set_xlabel("False Positive Rate (log scale)")
    ax.set_ylabel("True Positive Rate")
    ax.set_title(f"ROC on {report['target']}: {report['pairs']} pairs, {report['templates']} templates")
    ax.legend(loc="lower right")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# -- the command -------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    from ds_face.inference import add_model_args
    parser = argparse.ArgumentParser(prog="ds_face.eval ijb", description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="IJB release directory (loose_crop/, meta/)")
    parser.add_argument("--target", default="IJBC", help="IJBC or IJBB: meta/<target lower case>_*.txt (default IJBC)")
    add_model_args(parser, model_required=False)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="decode+align processes (0: in this process; default min(8, CPUs))")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"largest image decoded, width x height (default {MAX_PIXELS})")
    parser.add_argument("--features", metavar="FEATS.npz",
                        help="image features: written after embedding, or read instead of running the model "
                             "when the file exists and --model is not given")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --features file")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--plot", metavar="ROC.png", help="ROC curve (log-FPR axis) as a PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        check_args(args)
        started = time.perf_counter()
        meta = read_meta(args.root, args.target)
        read_seconds = time.perf_counter() - started
        started = time.perf_counter()
        features = Path(args.features) if args.features else None
        if features is not None and features.exists() and not args.model:
            feats = load_features(features, meta)
            source = str(features)
        else:
            model = _load_model(args)
            feats = image_features(meta, model, args.batch_size, args.device, args.workers, args.max_pixels,
                                   progress=not args.no_progress)
            source = args.model
            if features is not None:
                save_features(features, feats, meta, {"model": args.model, "backbone": args.backbone})
        embed_seconds = time.perf_counter() - started
        report, curve = evaluate_features(meta, feats)
    except IJBError as err:
        print(f"ds_face.eval ijb: error: {err}", file=sys.stderr)
        return 2
    report["seconds"] = {"read_meta": read_seconds, "features": embed_seconds, **report["seconds"]}
    report.update(features_from=source, model=args.model, backbone=args.backbone if args.model else None,
                  features=args.features)
    print(format_table([report]))
    if args.json:
        from ds_face.fileio import write_json_atomic
        write_json_atomic(args.json, report)
    if args.plot:
        plot_roc(args.plot, curve, report)
    return 0


def check_args(args) -> None:
    """Everything checkable before the long part: numbers, output directories, --features vs --model."""
    if args.batch_size < 1:
        raise IJBError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise IJBError(f"--workers must be >= 0, got {args.workers}")
    if args.max_pixels < 1:
        raise IJBError(f"--max-pixels must be >= 1, got {args.max_pixels}")
    for flag, value in (("--json", args.json), ("--plot", args.plot), ("--features", args.features)):
        if value and not Path(value).absolute().parent.is_dir():
            raise IJBError(f"{flag} {value}: directory {Path(value).absolute().parent} does not exist")
        if value and Path(value).is_dir():
            raise IJBError(f"{flag} {value}: is a directory")
    if args.features and not args.features.endswith(".npz"):
        raise IJBError(f"--features {args.features}: must end with .npz")
    exists = bool(args.features) and Path(args.features).exists()
    if not args.model and not exists:
        raise IJBError("--model is required" + (f" (--features {args.features} does not exist yet)"
                                                 if args.features else " (or --features with saved features)"))
    if args.model and exists and not args.overwrite:
        raise IJBError(f"--features {args.features} exists; drop --model to reuse it, or pass --overwrite to "
                       f"recompute and replace it (nothing was written)")


def _load_model(args):
    from ds_face.inference import load_model
    try:
        return load_model(args.model, args.backbone, args.embedding, args.device)
    except ValueError as err:  # the model file's or the backbone's problem (ConfigError, BackboneFileError, ...)
        raise IJBError(str(err)) from None


if __name__ == "__main__":
    sys.exit(main())
