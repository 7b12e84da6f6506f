"""The Arrow shard format: what `data_prep` writes and `ds_face.data.ArrowFaces` reads.

A converted dataset is a directory:

    manifest.json                  written last, atomically: a directory without it is not a dataset
    data-00000-of-00960.arrow      Arrow IPC *stream* files (what `datasets` itself writes), one schema:
    ...                              image: binary  the source JPEG (or PNG) bytes, untouched
                                     label: int64   class index in [0, num_classes)
                                     index: int64   the record's key in the source (.idx key, or file number)
    property, *.bin                carried over from beside the .rec (InsightFace property, validation sets)

`datasets.Dataset.from_file` and `datasets.load_dataset("arrow", data_files=..., streaming=True)` open the
shards directly. Shards hold equal numbers of rows (the first `num_samples % num_shards` hold one more).

ds_face itself reads a shard through one reader, `open_shard` (the pre-flight's and the loader's), which
accepts exactly what data_prep writes and nothing else: that schema (metadata aside), uncompressed valid
record batches without nulls, labels in [0, num_classes), images of at most MAX_IMAGE_BYTES; and a manifest
only through `read_manifest`: bounded, only its own keys, every value range-checked.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ds_face.data.store import Store, StoreError, is_remote, plain_name_problem
from ds_face.fileio import write_atomic

FORMAT = "ds_face.arrow-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int64()), ("index", pa.int64())])
ROWS_PER_RECORD_BATCH = 1000  # the unit `datasets` streams; its own writer uses the same cap
MIN_ROW_BYTES = 16  # the least a row takes in a shard: its int64 label and int64 index (image bytes aside)
# Bounds on what a manifest may say: far above any real dataset, low enough that nothing sized from them
# overflows int64 or allocates without bound.
MAX_MANIFEST_BYTES = 64 << 20  # data_prep writes ~200 bytes per shard; shard names allow 99,999 shards
MAX_SHARD_BYTES = 1 << 50  # 1 PiB
MAX_SAMPLES = MAX_SHARD_BYTES // MIN_ROW_BYTES
MAX_CLASSES = 2**31 - 1
MAX_IMAGE_SIDE = 4096  # ds_face trains 112x112 crops; image_size sizes the loader's batch buffers
MAX_IMAGE_BYTES = 16 << 20  # one encoded image; a 112x112 face is a few KB (read whole only for PNG)


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


_SHA256 = re.compile(r"^[0-9a-f]{64}\Z")


def confined(directory: str | os.PathLike, name: str, key: str) -> Path:
    """``directory/name``, refused unless it resolves (symlinks followed) to a place inside ``directory``."""
    problem = plain_name_problem(name)
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
    """Every shard read by ``open_shard`` (where the manifest says, its size, an Arrow stream of exactly the
    schema data_prep writes, no nulls, labels in range, ...) and, with ``full_hash``, of the manifest's sha256
    (reading every byte takes a while on a large dataset). Raises ShardError naming the shard.

    The pre-flight of a run (every rank, before any process group) and of embed: a dataset that would stop a
    run stops it here, on every rank alike. Reads each shard's metadata, offsets, labels and indexes (~20
    bytes a row, memory-mapped), not its images.

    A dataset in object storage is checked here by one listing (every shard there, of the manifest's size);
    each shard is read by ``open_shard`` and its sha256 checked when it arrives in the node's cache."""
    if is_remote(directory):
        return _check_remote_shards(manifest, str(directory))
    for i, path in enumerate(manifest.shard_paths(directory)):
        where = shard_where(directory, i, path)
        open_shard(path, manifest.shards[i], manifest.num_classes, where)
        if full_hash and sha256_of(path) != manifest.shards[i].sha256:
            raise ShardError(f"{where}: sha256 differs from the manifest's: a changed or foreign shard")


def _check_remote_shards(manifest: "Manifest", url: str) -> None:
    try:
        store = Store(url)
        sizes = store.list()
    except StoreError as err:
        raise ShardError(f"{url}: cannot list the dataset's prefix ({err})") from None
    for i, info in enumerate(manifest.shards):
        where = f"{store.where(info.file)} (shards[{i}] of {store.where(MANIFEST)})"
        if info.file not in sizes:
            raise ShardError(f"{where}: missing from the store")
        if sizes[info.file] != info.bytes:
            raise ShardError(f"{where}: {sizes[info.file]} bytes in the store, the manifest says {info.bytes}: "
                             f"the shard changed in the store since the dataset was written")


def shard_where(directory: str | os.PathLike, i: int, path: str | os.PathLike) -> str:
    """How messages name shard ``i``: its path, and where the manifest lists it."""
    return f"{path} (shards[{i}] of {Path(directory) / MANIFEST})"


def schema_problem(schema: pa.Schema) -> str | None:
    """Why ``schema`` is not exactly SCHEMA (names, order, types; metadata and nullability aside), or None."""
    expected = {f.name: f.type for f in SCHEMA}
    found = {f.name: f.type for f in schema}
    wanted = ", ".join(f"{f.name}: {f.type}" for f in SCHEMA)
    for name in expected:
        if name not in found:
            return f"no '{name}' column; data_prep writes exactly {wanted}"
    for f in schema:
        if f.name not in expected:
            return f"column {f.name!r:.80} ({f.type}) is not one data_prep writes ({wanted})"
        if f.type != expected[f.name]:
            return f"column '{f.name}' is {f.type}, expected {expected[f.name]}"
    if schema.names != SCHEMA.names:  # the same columns, once each, in another order
        return f"columns {', '.join(schema.names)[:200]}; data_prep writes exactly {wanted}"
    return None


def open_shard(path: str | os.PathLike, info: ShardInfo, num_classes: int, where: str | None = None) -> pa.Table:
    """The one reader of a shard: the training loader's and the pre-flight's (``check_shard_files``).

    Default deny, checked before anything else reads the file, all of it against what data_prep writes: a
    regular file of the manifest's size, an Arrow IPC stream whose schema is exactly SCHEMA, every record
    batch valid Arrow (offsets inside their buffers) with no nulls, images of at most MAX_IMAGE_BYTES, the
    manifest's row count, labels in [0, num_classes). Returns the memory-mapped table (nothing copied; image
    bytes are not read here). ShardError names the shard, and the record batch or row."""
    where, batches = where or str(path), []
    if not os.path.isfile(path):
        raise ShardError(f"{where}: missing" + (" (not a regular file)" if os.path.exists(path) else ""))
    size = os.path.getsize(path)
    if size != info.bytes:
        what = "empty" if size == 0 else ("truncated" if size < info.bytes else "larger than written")
        raise ShardError(f"{where}: {size} bytes, the manifest says {info.bytes}: {what}, or a shard of another "
                         f"dataset")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"\xff\xff\xff\xff":  # an Arrow IPC stream opens with the continuation marker
        raise ShardError(f"{where}: not an Arrow IPC stream (starts with {head!r})")
    try:
        messages = pa.ipc.MessageReader.open_stream(pa.memory_map(str(path)))
        first = next(iter(messages), None)
        if first is None or first.type != "schema":
            raise ShardError(f"{where}: an Arrow stream must open with its schema, found "
                             f"{first.type if first else 'nothing'}")
        schema = pa.ipc.read_schema(first)
        if problem := schema_problem(schema):  # before any record batch is read
            raise ShardError(f"{where}: {problem}")
        row = 0
        for n, message in enumerate(messages):
            if message.type != "record batch":
                raise ShardError(f"{where}: message {n + 1} is a {message.type}; data_prep writes only record "
                                 f"batches after the schema")
            if _body_compressed(message.metadata.to_pybytes()):  # pyarrow would inflate it whole to read it
                raise ShardError(f"{where}: record batch {n} is compressed; data_prep writes uncompressed shards")
            batch = pa.ipc.read_record_batch(message, schema)  # zero-copy: views of the memory map
            _check_batch(batch, n, row, num_classes, where)
            batches.append(batch)
            row += batch.num_rows
    except (pa.ArrowException, OSError, struct.error) as err:  # pa.ArrowInvalid is both of the first two
        raise ShardError(f"{where}: not a readable Arrow stream ({type(err).__name__}: {err})") from None
    if row != info.rows:
        raise ShardError(f"{where}: holds {row} rows, the manifest says {info.rows}")
    return pa.Table.from_batches(batches, schema=schema)


def _check_batch(batch: pa.RecordBatch, n: int, row: int, num_classes: int, where: str) -> None:
    """Record batch ``n`` of a shard (its first row is the shard's row ``row``), against what data_prep writes."""
    try:
        batch.validate(full=True)  # offsets inside the data, lengths inside their buffers: safe to slice
    except pa.ArrowException as err:
        raise ShardError(f"{where}: record batch {n} is not valid Arrow ({err})") from None
    for name, column in zip(batch.schema.names, batch.columns):
        if column.null_count:
            first = row + int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
            raise ShardError(f"{where}, row {first}: '{name}' is null ({column.null_count} null(s) in record "
                             f"batch {n}); data_prep writes no nulls")
    lengths = pc.binary_length(batch.column("image")).to_numpy()  # from the offsets: no image byte is read
    bad = np.flatnonzero(lengths > MAX_IMAGE_BYTES)
    if len(bad):
        raise ShardError(f"{where}, row {row + bad[0]}: an image of {lengths[bad[0]]} bytes, more than the "
                         f"{MAX_IMAGE_BYTES >> 20} MiB an image may take")
    labels = batch.column("label").to_numpy()
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        index = batch.column("index")[int(bad[0])].as_py()
        raise ShardError(f"{where}, row {row + bad[0]} (index {index}): label {labels[bad[0]]} outside "
                         f"[0, {num_classes}) (num_classes in manifest.json)")


def _body_compressed(metadata: bytes) -> bool:
    """Whether a record batch message says its body is compressed, read from the message's flatbuffer (Arrow's
    Message.fbs: Message.header -> RecordBatch.compression) before pyarrow decodes, and would inflate, it.
    pyarrow has verified the flatbuffer when it read the message."""
    def field(table: int, index: int) -> int:  # where field ``index`` of the table at ``table`` is, 0 if absent
        vtable = table - struct.unpack_from("<i", metadata, table)[0]
        if 6 + 2 * index > struct.unpack_from("<H", metadata, vtable)[0]:
            return 0
        at = struct.unpack_from("<H", metadata, vtable + 4 + 2 * index)[0]
        return table + at if at else 0
    header = field(struct.unpack_from("<I", metadata, 0)[0], 2)  # Message.header: the RecordBatch table
    return field(header + struct.unpack_from("<I", metadata, header)[0], 3) != 0  # RecordBatch.compression


@contextlib.contextmanager
def naming_shard(path: str | os.PathLike):
    """Turn an error while reading one shard (pyarrow's ``ArrowInvalid: File is too small``, an OSError)
    into a ShardError that names the shard: ``with naming_shard(path): ...read it...``."""
    try:
        yield
    except (pa.ArrowInvalid, OSError) as err:  # pa.ArrowIOError is an OSError
        raise ShardError(f"{path}: cannot read this Arrow shard ({type(err).__name__}: {err})") from None


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of a converted dataset, checked for shape (not checksums: `data_prep.verify` does those).

    Bounded (at most MAX_MANIFEST_BYTES read, JSON nesting limited before parsing) and default deny:
    only the keys ds_face writes, each of its type, every number range-checked; ShardError names the key.

    Read and checked once per process (the config's checks, ``head.num_classes: auto`` and the loader all ask):
    a later call returns the same checked Manifest (do not change it) while manifest.json is the same file
    with the same size and times; any change to it is read and checked again."""
    if is_remote(directory):
        return _read_remote_manifest(str(directory))
    path = Path(directory) / MANIFEST
    if not path.is_file():
        hint = " (a conversion that never finished leaves no manifest)" if Path(directory).is_dir() else ""
        raise ShardError(f"{path}: not found; is {directory} a dataset written by data_prep{hint}?")
    st = path.stat()  # before the read: a change during the read leaves a key that no later stat matches
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    where = os.path.realpath(path)
    cached = _MANIFESTS.get(where)
    if cached is not None and cached[0] == key:
        return cached[1]
    from ds_face.config.bounded import load_json_file  # the one bounded JSON reader (imports no torch)
    from ds_face.config.schema import ConfigError
    try:
        raw = load_json_file(path, MAX_MANIFEST_BYTES, "manifest")  # size bounded before, depth while parsing
    except ConfigError as err:
        raise ShardError(str(err)) from None
    manifest = _manifest_from_json(raw, path)
    if len(_MANIFESTS) >= 16:  # a process reads one or two datasets; tests read many
        _MANIFESTS.pop(next(iter(_MANIFESTS)))
    _MANIFESTS[where] = (key, manifest)
    return manifest


_MANIFESTS: dict[str, tuple[tuple, Manifest]] = {}  # realpath of manifest.json -> (its stat key, the checked Manifest)


def _read_remote_manifest(url: str) -> Manifest:
    """The manifest of a dataset in object storage: the same bounded read and checks as a local one's."""
    from ds_face.config.bounded import parse_json
    from ds_face.config.schema import ConfigError
    where = f"{url.rstrip('/')}/{MANIFEST}"
    try:
        data = Store(url).read(MANIFEST, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ShardError(f"{where}: not found; is {url} a dataset written by data_prep (a conversion that never "
                         f"finished leaves no manifest)?") from None
    except StoreError as err:
        raise ShardError(str(err)) from None
    try:
        raw = parse_json(data.decode("utf-8", errors="strict"), where)
    except UnicodeDecodeError as err:
        raise ShardError(f"{where}: not UTF-8 text ({err})") from None
    except ConfigError as err:
        raise ShardError(str(err)) from None
    return _manifest_from_json(raw, where)


def _manifest_from_json(raw, path: Path) -> Manifest:
    def fail(msg: str):
        raise ShardError(f"{path}: {msg}")

    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        fail(f"'format' is {raw.get('format') if isinstance(raw, dict) else raw!r:.80}, expected {FORMAT!r}")
    if type(raw.get("format_version")) is not int or raw["format_version"] != FORMAT_VERSION:
        fail(f"format_version {raw.get('format_version')!r:.80}; this ds_face reads {FORMAT_VERSION}")
    known = [f.name for f in fields(Manifest)]
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        fail(f"{unknown[0]!r:.80} is not a manifest key (data_prep writes {', '.join(known)})")
    for key in ("num_samples", "num_classes", "shards"):
        if key not in raw:
            fail(f"'{key}' is missing")
    _check_int(path, "num_samples", raw["num_samples"], 1, MAX_SAMPLES)
    _check_int(path, "num_classes", raw["num_classes"], 1, MAX_CLASSES)
    size = raw.get("image_size", [112, 112])
    if not (isinstance(size, list) and len(size) == 2
            and all(type(v) is int and 1 <= v <= MAX_IMAGE_SIDE for v in size)):
        fail(f"'image_size' must be [height, width], two integers in [1, {MAX_IMAGE_SIDE}], got {size!r:.80}")
    if not isinstance(raw.get("converter", ""), str) or len(raw.get("converter", "")) > 200:
        fail(f"'converter' must be a short string, got {raw['converter']!r:.80}")
    if not isinstance(raw.get("options", {}), dict):
        fail(f"'options' must be a mapping, got {raw['options']!r:.80}")
    for key in ("sources", "carried"):
        if not isinstance(raw.get(key, []), list):
            fail(f"'{key}' must be a list, got {raw[key]!r:.80}")
    for i, source in enumerate(raw.get("sources", [])):  # informational: what was converted
        if not (isinstance(source, dict) and isinstance(source.get("file"), str)):
            fail(f"'sources[{i}]' must be a mapping with a 'file' name, got {source!r:.80}")
        if "bytes" in source:
            _check_int(path, f"sources[{i}].bytes", source["bytes"], 0, MAX_SHARD_BYTES)
    for i, name in enumerate(raw.get("carried", [])):
        if problem := plain_name_problem(name):
            fail(f"'carried[{i}]' {problem}")

    shards = raw["shards"]
    if not isinstance(shards, list) or not shards:
        fail(f"'shards' must be a non-empty list of shards, got {shards!r:.80}")
    infos = []
    for i, shard in enumerate(shards):  # every value is used to open, size or check a file: check them all
        if not isinstance(shard, dict) or sorted(shard) != sorted(f.name for f in fields(ShardInfo)):
            fail(f"'shards[{i}]' must be a mapping of exactly file, rows, bytes, sha256, got {shard!r:.120}")
        if problem := plain_name_problem(shard["file"]):
            fail(f"'shards[{i}].file' {problem}")
        _check_int(path, f"shards[{i}].bytes", shard["bytes"], 0, MAX_SHARD_BYTES)
        _check_int(path, f"shards[{i}].rows", shard["rows"], 0, MAX_SAMPLES)
        if shard["rows"] * MIN_ROW_BYTES > shard["bytes"]:  # a count is bounded by the bytes that would hold it
            fail(f"'shards[{i}].rows' is {shard['rows']}, but the shard's {shard['bytes']} bytes hold at most "
                 f"{shard['bytes'] // MIN_ROW_BYTES} rows ({MIN_ROW_BYTES} bytes each at least)")
        if not isinstance(shard["sha256"], str) or not _SHA256.match(shard["sha256"]):
            fail(f"'shards[{i}].sha256' must be 64 lowercase hex digits, got {shard['sha256']!r:.80}")
        infos.append(ShardInfo(**shard))
    names = [s.file for s in infos]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        fail(f"shard {dup!r} is listed twice")
    total = sum(s.rows for s in infos)
    if raw["num_samples"] != total:
        fail(f"num_samples {raw['num_samples']} but the {len(infos)} shards hold {total} rows")
    return Manifest(**{**raw, "shards": infos})


def _check_int(path: Path, key: str, value, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:  # type(): a bool is not a count
        top = f"2**{high.bit_length() - 1}" if high & (high - 1) == 0 else f"{high:,}"
        raise ShardError(f"{path}: '{key}' must be an integer in [{low}, {top}], got {value!r:.80}")
