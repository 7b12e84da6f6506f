"""The three meta files of an IJB-B/C release (where they are: ``ds_face.config.ijb_layout``), parsed and cross-checked,
every bad line named by file and line."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from ds_face.config.ijb_layout import check_layout, meta_files


class IJBError(ValueError):
    """IJB input that cannot be used; the message names the file (and the line)."""


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
