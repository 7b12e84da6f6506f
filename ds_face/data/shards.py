"""The Arrow shard format: what `data_prep` writes and `ds_face.data.ArrowFaces` reads.

A converted dataset is a directory:

    manifest.json                  written last, atomically: a directory without it is not a dataset
    data-00000-of-00960.arrow      Arrow IPC *stream* files (what `datasets` itself writes), one schema:
    ...                              image: binary  the source JPEG bytes, untouched
                                     label: int64   class index in [0, num_classes)
                                     index: int64   the record's key in the source (.idx key, or file number)
    property, *.bin                carried over from beside the .rec (InsightFace property, validation sets)

`datasets.Dataset.from_file` (memory-mapped, what `ds_face.data.arrow` uses) and
`datasets.load_dataset("arrow", data_files=..., streaming=True)` open the shards directly. Shards hold equal
numbers of rows (the first `num_samples % num_shards` hold one more).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from ds_face.fileio import write_atomic

FORMAT = "ds_face.arrow-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("index", pa.int64())])
ROWS_PER_RECORD_BATCH = 1000  # the unit `datasets` streams; its own writer uses the same cap
MIN_ROW_BYTES = 16  # the least a row takes in a shard: its int64 label and int64 index (image bytes aside)


class ShardError(ValueError):
    """A converted dataset that is missing, incomplete or does not match its manifest; the message names the file."""


def shard_name(i: int, num_shards: int) -> str:
    return f"data-{i:05d}-of-{num_shards:05d}.arrow"


def rows_per_shard(num_samples: int, num_shards: int) -> list[int]:
    """Equal shares, the first `num_samples % num_shards` shards one row more."""
    base, extra = divmod(num_samples, num_shards)
    return [base + (i < extra) for i in range(num_shards)]


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    file: str  # name relative to the dataset directory
    rows: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    num_samples: int
    num_classes: int
    shards: list[ShardInfo]
    image_size: list[int] = field(default_factory=lambda: [112, 112])  # height, width
    sources: list[dict] = field(default_factory=list)  # {"file", "bytes"} of each input file
    carried: list[str] = field(default_factory=list)  # files copied beside the shards (property, *.bin)
    converter: str = ""  # e.g. "data_prep.rec2arrow 0.1.0"
    options: dict = field(default_factory=dict)  # the conversion options that shape the shards (order, seed)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def write(self, directory: str | os.PathLike) -> Path:
        """Atomically and durably: a reader sees the old manifest or the new one, never half of one."""
        path = Path(directory) / MANIFEST
        write_atomic(path, self.to_json().encode())
        return path

    def shard_paths(self, directory: str | os.PathLike) -> list[str]:
        """The shards' paths, each checked to lie inside ``directory`` (a symlink may not lead out of it)."""
        return [str(confined(directory, s.file, f"shards[{i}].file")) for i, s in enumerate(self.shards)]


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _plain_name_problem(name) -> str | None:
    """Why ``name`` is not a plain file name as data_prep writes it (``data-00000-of-00008.arrow``), or None."""
    if not isinstance(name, str) or not name:
        return f"must be a file name, got {name!r}"
    if "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        return f"{name!r} is a path; shards must be plain file names inside the dataset directory"
    if name in (".", "..") or "\0" in name:
        return f"{name!r} is not a file name"
    return None


def confined(directory: str | os.PathLike, name: str, key: str) -> Path:
    """``directory/name``, refused unless it resolves (symlinks followed) to a place inside ``directory``."""
    problem = _plain_name_problem(name)
    if problem:
        raise ShardError(f"{Path(directory) / MANIFEST}: '{key}' {problem}")
    path = Path(directory) / name
    root = os.path.realpath(directory)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise ShardError(f"{Path(directory) / MANIFEST}: '{key}' {name!r} is a symlink to {real}, outside "
                         f"{root}; shards must lie inside the dataset directory")
    return path


def check_shard_files(manifest: "Manifest", directory: str | os.PathLike, full_hash: bool = False) -> None:
    """Each shard is where the manifest says, a regular file of the manifest's size, an Arrow stream (and,
    with ``full_hash``, of the manifest's sha256; reading every byte takes a while on a large dataset).

    Catches a zero-byte or truncated shard, a shard from another dataset, a missing one; raises ShardError
    naming the shard. Cheap without ``full_hash``: one stat and a 4-byte read per shard.
    """
    for i, (info, path) in enumerate(zip(manifest.shards, manifest.shard_paths(directory))):
        where = f"{path} (shards[{i}] of {Path(directory) / MANIFEST})"
        if not os.path.isfile(path):
            raise ShardError(f"{where}: missing" + (" (not a regular file)" if os.path.exists(path) else ""))
        size = os.path.getsize(path)
        if size != info.bytes:
            what = "empty" if size == 0 else ("truncated" if size < info.bytes else "larger than written")
            raise ShardError(f"{where}: {size} bytes, the manifest says {info.bytes}: {what}, or a shard of "
                             f"another dataset")
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"\xff\xff\xff\xff":  # an Arrow IPC stream opens with the continuation marker
            raise ShardError(f"{where}: not an Arrow IPC stream (starts with {head!r})")
        if full_hash and sha256_of(path) != info.sha256:
            raise ShardError(f"{where}: sha256 differs from the manifest's: a changed or foreign shard")


@contextlib.contextmanager
def naming_shard(path: str | os.PathLike):
    """Turn an error while reading one shard (pyarrow's ``ArrowInvalid: File is too small``, an OSError)
    into a ShardError that names the shard: ``with naming_shard(path): ...read it...``."""
    try:
        yield
    except (pa.ArrowInvalid, OSError) as err:  # pa.ArrowIOError is an OSError
        raise ShardError(f"{path}: cannot read this Arrow shard ({type(err).__name__}: {err})") from None


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of a converted dataset, checked for shape (not checksums: `data_prep.verify` does those)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        hint = " (a conversion that never finished leaves no manifest)" if Path(directory).is_dir() else ""
        raise ShardError(f"{path}: not found; is {directory} a dataset written by data_prep{hint}?")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ShardError(f"{path}: 'format' is {raw.get('format') if isinstance(raw, dict) else raw!r}, "
                         f"expected {FORMAT!r}")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format_version {raw.get('format_version')!r}; this ds_face reads "
                         f"{FORMAT_VERSION}")
    try:
        shards = [ShardInfo(**s) for s in raw.pop("shards")]
        manifest = Manifest(shards=shards, **raw)
    except (KeyError, TypeError) as e:
        raise ShardError(f"{path}: malformed ({e})") from None
    for i, shard in enumerate(shards):  # every value is used to open, size or check a file: check them all
        problem = _plain_name_problem(shard.file)
        if problem:
            raise ShardError(f"{path}: 'shards[{i}].file' {problem}")
        for key in ("rows", "bytes"):
            value = getattr(shard, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ShardError(f"{path}: 'shards[{i}].{key}' must be an integer >= 0, got {value!r}")
        if shard.rows * MIN_ROW_BYTES > shard.bytes:  # a count is bounded by the bytes that would hold it
            raise ShardError(f"{path}: 'shards[{i}].rows' is {shard.rows}, but the shard's {shard.bytes} bytes "
                             f"hold at most {shard.bytes // MIN_ROW_BYTES} rows ({MIN_ROW_BYTES} bytes each at least)")
        if not isinstance(shard.sha256, str) or not _SHA256.match(shard.sha256):
            raise ShardError(f"{path}: 'shards[{i}].sha256' must be 64 lowercase hex digits, got {shard.sha256!r}")
    names = [s.file for s in shards]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ShardError(f"{path}: shard {dup!r} is listed twice")
    for key in ("num_samples", "num_classes"):
        value = getattr(manifest, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ShardError(f"{path}: '{key}' must be an integer, got {value!r}")
    if manifest.num_samples != sum(s.rows for s in shards) or not shards:
        raise ShardError(f"{path}: num_samples {manifest.num_samples} but the {len(shards)} shards hold "
                         f"{sum(s.rows for s in shards)} rows")
    if manifest.num_samples < 1 or manifest.num_classes < 1:
        raise ShardError(f"{path}: an empty dataset ({manifest.num_samples} samples, "
                         f"{manifest.num_classes} classes)")
    return manifest
