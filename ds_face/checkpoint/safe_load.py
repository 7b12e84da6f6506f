"""The one way ds_face reads a torch file: weights-only, so that a file can hold data but never run code.

``torch.load(weights_only=True)`` rebuilds tensors, containers and plain values, and refuses every other
global a pickle names (``os.system``, ``builtins.exec``, ``subprocess.Popen``, any class). DeepSpeed 0.19.8's
own checkpoint files hold a few of its objects besides tensors; exactly those are allowed
(``DEEPSPEED_GLOBALS``, found by saving real checkpoints at ZeRO 0/1/2/3 in fp32, bf16 and fp16 and listing
what the weights-only loader refused). Each is rebuilt from data alone (an Enum looked up by value, plain
objects whose ``__dict__`` is filled in): nothing in them runs code from the file.

Bounded before torch reads anything (``load_weights_only``): the zip directory is checked first (``check_archive``:
every entry stored, inside the file, no overlap, headers agreeing: a deflated 1 MB file never inflates to 1 GiB),
then the pickle is walked by CPython's own unpickler with every global replaced by an inert class (``_Scan``):
the globals it names must be in a narrower allow-list than torch's (``_allowed_globals``: no ``bytearray(n)``,
quantized, sparse or meta rebuilders), and the storages it declares must be the archive's entries exactly, or fit
in a legacy file. After torch's own weights-only load every tensor must be dense and within its storage
(``ds_face.checkpoint.tensor_checks.check_layout``): an expanded view never stands for more memory than the file holds.

DeepSpeed itself loads its files with ``weights_only=False`` (``engine.load_checkpoint`` on resume,
``zero_to_fp32`` on export). ``check_checkpoint_dir`` therefore passes every file of a tag directory, at any
depth and whatever its name (default deny: only ``ds_face_meta.json`` is not a torch file), through the
weights-only loader first (memory-mapped: only the pickle is read, not the tensor data); a refused file, a link,
a device or a fifo stops everything before DeepSpeed unpickles anything.
"""
from __future__ import annotations

import functools
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable

# module.name of every non-torch global in DeepSpeed 0.19.8 checkpoint files (which files: see above)
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # ZeRO 1-3 optimizer shards: the stage
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO 1-3 optimizer shards, fp32/bf16: static scale 1
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # ZeRO 1-3 optimizer shards, fp16
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO 1-2 optimizer shards: where a param's slice lies
)


class UnsafeFileError(ValueError):
    """A torch file that cannot be read weights-only; the message names the file (and the refused global)."""

    def __init__(self, path, problem: str, refused: str | None = None):
        super().__init__(f"{path}: {problem}")
        self.path, self.refused = str(path), refused


def _deepspeed_classes() -> list:
    import importlib
    classes = []
    for dotted in DEEPSPEED_GLOBALS:
        module, name = dotted.rsplit(".", 1)
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def _pickle_bytes(path: Path) -> bytes:
    """The pickle inside a torch file: ``<archive>/data.pkl`` of the zip format (its directory checked first,
    ``check_archive``: nothing is decompressed), else the first MiB of the file itself."""
    with open(path, "rb") as f:
        if f.read(4) != ZIP_MAGIC:
            f.seek(0)
            return f.read(1 << 20)  # a legacy file's first pickle (magic number, protocol, sys info) comes first
    prefix, entries = check_archive(path)
    return _read_entry(path, entries.get(f"{prefix}/data.pkl"))


# -- archives: bounded before anything is read from them --------------------------------------------------

ZIP_MAGIC = b"PK\x03\x04"  # how torch tells its zip format from the legacy one: the file's first four bytes
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # signature, version, flags, method, time, date, crc, sizes, name/extra


def check_archive(path: str | os.PathLike) -> tuple[str, dict[str, tuple[int, int]]]:
    """The directory of a torch zip file, checked before any entry is read: (archive folder, {name: (offset of
    its data, size)}).

    torch writes every entry stored (uncompressed), one after the other, under one folder. So each entry must be
    stored and unencrypted, its local header must agree with the central directory (name, method, sizes), names
    are unique, and the entries' data lie inside the file without overlapping: together at most the file's size.
    A deflated entry (a 1 MB file that inflates to 1 GiB), overlapping entries or a header that says something
    else than the directory are refused, naming the entry. Raises UnsafeFileError."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
            spans, entries = [], {}
            for info in infos:
                name = info.filename
                if name in entries:
                    raise UnsafeFileError(path, f"entry {name!r} appears twice in the archive; refused")
                if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
                    raise UnsafeFileError(path, f"entry {name!r} is {'encrypted' if info.flag_bits & 1 else 'compressed'} "
                                          f"(method {info.compress_type}, {info.file_size} bytes declared from "
                                          f"{info.compress_size}); torch stores every entry uncompressed, so this "
                                          f"was not written by torch.save; refused before inflating anything")
                if info.file_size != info.compress_size:
                    raise UnsafeFileError(path, f"entry {name!r} declares {info.file_size} bytes stored in "
                                          f"{info.compress_size}; refused")
                f.seek(info.header_offset)
                header = f.read(_LOCAL_HEADER.size)
                if len(header) != _LOCAL_HEADER.size:
                    raise UnsafeFileError(path, f"entry {name!r}: its header lies past the end of the file")
                sig, _, flags, method, _, _, _, csize, usize, nlen, elen = _LOCAL_HEADER.unpack(header)
                local_name = f.read(nlen)
                sizes_agree = flags & 8 or {csize, usize} <= {info.file_size, 0xFFFFFFFF}
                if sig != ZIP_MAGIC or method != info.compress_type or not sizes_agree \
                        or local_name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437"):
                    raise UnsafeFileError(path, f"entry {name!r}: its local header disagrees with the archive's "
                                          f"directory (name, method or size); refused")
                start = info.header_offset + _LOCAL_HEADER.size + nlen + elen
                spans.append((info.header_offset, start + info.file_size, name))
                entries[name] = (start, info.file_size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as err:
        if isinstance(err, UnsafeFileError):
            raise
        raise UnsafeFileError(path, f"not a readable torch file (a damaged archive: {err})") from None
    spans.sort()
    for (_, end, name), (begin, _, following) in zip(spans, spans[1:]):
        if end > begin:
            raise UnsafeFileError(path, f"entries {name!r} and {following!r} overlap in the file; refused (a "
                                  f"torch archive stores each entry once)")
    if not spans or spans[0][0] != 0 or spans[-1][1] > size:
        raise UnsafeFileError(path, "not a readable torch file (its archive directory does not describe the file "
                              "from its first byte to its end)")
    prefix = next(iter(entries)).split("/", 1)[0]
    stray = next((n for n in entries if not n.startswith(f"{prefix}/")), None)
    if stray is not None:
        raise UnsafeFileError(path, f"entry {stray!r} lies outside the archive folder {prefix!r}; refused")
    return prefix, entries


def _read_entry(path: Path, entry: tuple[int, int] | None) -> bytes:
    if entry is None:
        return b""
    with open(path, "rb") as f:
        f.seek(entry[0])
        return f.read(entry[1])  # stored: exactly its bytes, at most the file's size (check_archive)


# -- the pickle, read without resolving anything -----------------------------------------------------------

# module.name of every global a torch file written by ds_face, DeepSpeed or arcface_torch names (a state_dict,
# a checkpoint): an OrderedDict, tensors, their storage types and dtypes, and DEEPSPEED_GLOBALS. Narrower than
# torch's weights-only list on purpose: bytearray(n), quantized, nested, sparse and subclass rebuilders are not
# needed, and some of them allocate what the pickle asks for while it is being read.
TORCH_GLOBALS = ("collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
                 "torch._utils._rebuild_parameter", "torch._tensor._rebuild_from_type_v2", "torch.Tensor",
                 "torch.nn.parameter.Parameter", "torch.Size", "torch.device", "torch.storage.UntypedStorage")


@functools.lru_cache(maxsize=1)
def _allowed_globals() -> frozenset[str]:
    import torch
    names = set(TORCH_GLOBALS) | set(DEEPSPEED_GLOBALS)
    names |= {f"torch.{n}" for n in dir(torch) if n.endswith("Storage") and n[0].isupper() and n[0] != "Q"
              and n not in ("Storage", "TypedStorage", "UntypedStorage")}  # FloatStorage & co., not quantized
    names |= {f"torch.{n}" for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)}
    return frozenset(names)


class _Inert:
    """What the scan builds where the pickle names a global: an object that calls nothing and keeps nothing."""
    dotted = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _Refused(Exception):
    pass


class _StorageRef(_Inert):
    """A storage as the scan sees it: its key and the bytes the pickle declares for it."""

    def __init__(self, key: str, nbytes: int, item: int):
        self.key, self.nbytes, self.item = key, nbytes, item


class _TensorCall(_Inert):
    """``_rebuild_tensor_v2/v3(storage, offset, size, stride, requires_grad, hooks[, dtype, ...])`` in the scan:
    the view torch will build, checked against the bytes its storage declares before torch builds anything."""

    def __init__(self, storage=None, offset=0, size=(), stride=(), *rest, **kwargs):
        import torch
        if not isinstance(storage, _StorageRef):
            return  # not a storage: torch's own load refuses it
        dtype = getattr(rest[2], "dotted", "") if len(rest) > 2 else ""  # v3 names the dtype (v2: the storage's)
        item = getattr(torch, dtype[len("torch."):]).itemsize if dtype in _allowed_globals() else storage.item
        numbers = [offset, *size, *stride] if isinstance(size, tuple) and isinstance(stride, tuple) else [None]
        if len(size) != len(stride) or not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
            raise _Refused(f"a tensor of storage {storage.key!r} has size {size!r}, stride {stride!r}, offset "
                           f"{offset!r}, not one integer per dimension")
        if min(numbers) < 0:
            raise _Refused(f"a tensor of storage {storage.key!r} has a negative size, stride or offset (size "
                           f"{list(size)}, stride {list(stride)}, offset {offset})")
        end = 0 if 0 in size else (offset + sum((n - 1) * st for n, st in zip(size, stride)) + 1) * item
        if end > storage.nbytes:
            raise _Refused(f"a tensor of shape {list(size)} (strides {list(stride)}, offset {offset}) reaches byte "
                           f"{end} of storage {storage.key!r}, which holds {storage.nbytes}")


class _Scan(pickle.Unpickler):
    """CPython's own unpickler, with every global replaced by an ``_Inert`` class: it walks exactly the opcodes
    torch will, records each global named (``found``) and the bytes each storage declares (``storages``), and
    runs nothing. The persistent ids are torch's ``('storage', <type>, key, location, numel[, view])``."""

    def __init__(self, file, found: list, storages: dict):
        super().__init__(file, encoding="utf-8")
        self.found, self.storages = found, storages

    def find_class(self, module, name):
        import _compat_pickle
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        dotted = f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"
        self.found.append(dotted)
        if dotted == "torch.Size":
            return tuple  # the sizes themselves, for _TensorCall: building a tuple runs nothing
        base = _TensorCall if dotted in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3") \
            else _Inert
        return type("Inert", (base,), {"dotted": dotted})

    def persistent_load(self, pid):
        import torch
        kind = pid[0] if isinstance(pid, tuple) and pid else None
        kind = kind.decode("ascii", "replace") if isinstance(kind, bytes) else kind
        if kind != "storage" or len(pid) not in (5, 6):
            raise _Refused(f"an unknown persistent id {str(pid)[:80]!r}")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        dotted = getattr(storage_type, "dotted", "")
        if dotted in self.found and dotted not in _allowed_globals():
            return _Inert()  # a global the allow-list refuses: load_weights_only names it
        if not dotted.endswith("Storage"):
            raise _Refused(f"storage {key!r} has the type {dotted or type(storage_type).__name__}")
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise _Refused(f"storage {key!r} declares {numel!r} elements")
        from torch.storage import _get_dtype_from_pickle_storage_type as storage_dtype
        item = 1 if dotted == "torch.storage.UntypedStorage" else \
            torch._utils._element_size(storage_dtype(dotted[len("torch."):]))
        key = key.decode("ascii", "replace") if isinstance(key, bytes) else str(key)
        nbytes = numel * item
        if self.storages.setdefault(key, nbytes) != nbytes:
            raise _Refused(f"storage {key!r} is declared with two sizes")
        view = pid[5] if len(pid) == 6 else None  # legacy: (view key, offset, size) of a slice of the storage
        if isinstance(view, tuple) and len(view) == 3 and all(isinstance(n, int) for n in view[1:]):
            nbytes = min(nbytes - view[1] * item, view[2] * item)
        return _StorageRef(key, nbytes, item)


def _scan(path: Path) -> tuple[list[str], dict[str, int], dict[str, tuple[int, int]] | None, str]:
    """(globals named, {storage key: bytes declared}, the archive's entries or None for the legacy format, the
    archive folder). Reads the pickle(s) only; raises UnsafeFileError for a damaged file, _Refused for a
    forbidden construct (naming it). Memory: the pickle's own size, a small multiple at most."""
    import tarfile
    found: list[str] = []
    storages: dict[str, int] = {}
    with open(path, "rb") as f:
        legacy = f.read(4) != ZIP_MAGIC
    try:
        if not legacy:
            prefix, entries = check_archive(path)
            if f"{prefix}/data.pkl" not in entries:
                raise UnsafeFileError(path, f"not a readable torch file (no {prefix}/data.pkl in the archive)")
            _Scan(io.BytesIO(_read_entry(path, entries[f"{prefix}/data.pkl"])), found, storages).load()
            return found, storages, entries, prefix
        if tarfile.is_tarfile(path):
            raise _Refused("torch's tar format (before torch 1.0), which ds_face does not read")
        with open(path, "rb") as f:  # magic number, protocol, sys info, the data, the storage keys: five pickles
            for _ in range(5):
                _Scan(f, found, storages).load()
        return found, storages, None, ""
    except (_Refused, UnsafeFileError):
        raise
    except RecursionError:
        raise UnsafeFileError(path, "not a readable torch file (its pickle is nested too deeply)") from None
    except Exception as err:  # noqa: BLE001 - a damaged or foreign pickle: name a forbidden global read before it
        refused = next((g for g in found if g not in _allowed_globals()), None)
        if refused:
            raise _refusal(path, refused) from None
        raise UnsafeFileError(path, f"not a readable torch file ({type(err).__name__}: {err}; truncated or not "
                              f"written by torch.save?)") from None


def named_globals(path: str | os.PathLike) -> list[str]:
    """The globals a torch file's pickle names, as ``module.name`` (Python 2 names mapped as the unpickler maps
    them), in order; for a damaged pickle, those named before the damage. Nothing is resolved or called."""
    found: list[str] = []
    path = Path(path)
    try:
        with open(path, "rb") as f:
            zipped = f.read(4) == ZIP_MAGIC
        data = _pickle_bytes(path) if zipped else None
        with (io.BytesIO(data) if zipped else open(path, "rb")) as f:
            for _ in range(1 if zipped else 5):
                _Scan(f, found, {}).load()
    except Exception:  # noqa: BLE001 - what was read up to the damage
        pass
    return found


def _refusal(path: Path, refused: str) -> UnsafeFileError:
    return UnsafeFileError(path, f"refused to load: it names the global {refused}, which ds_face's weights-only "
                           f"load does not allow (a checkpoint or model holds only tensors, plain values and "
                           f"{len(DEEPSPEED_GLOBALS)} DeepSpeed types); this file may be malicious", refused)


def load_weights_only(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's few checkpoint types allowed, bounded.

    Before torch reads anything: the archive's directory (``check_archive``: stored entries inside the file),
    then the pickle, walked without resolving anything (``_Scan``): every global it names must be in
    ``_allowed_globals`` (e.g. ``posix.system`` is refused and never called), and the storages it declares must
    be the archive's entries exactly (zip) or fit in the file (legacy). After torch's own weights-only load:
    every tensor dense and within its storage (``ds_face.checkpoint.tensor_checks.check_layout``), so no view stands for
    more memory than the file holds. Raises UnsafeFileError naming the file.
    ``mmap=True`` maps the tensor data instead of reading it (zip-format files; others are read).
    """
    import torch

    from ds_face.checkpoint.tensor_checks import TensorCheckError, check_layout
    path = Path(path)
    if not path.is_file():
        raise UnsafeFileError(path, "no such file")
    size = path.stat().st_size
    try:
        found, storages, entries, prefix = _scan(path)
    except _Refused as err:
        raise UnsafeFileError(path, f"refused to load: {err}; this file may be malicious") from None
    allowed = _allowed_globals()
    refused = next((g for g in found if g not in allowed), None)
    if refused:
        raise _refusal(path, refused)
    if entries is not None:
        for key, nbytes in storages.items():
            entry = entries.get(f"{prefix}/data/{key}")
            if entry is None or entry[1] != nbytes:
                raise UnsafeFileError(path, f"storage {key!r} declares {nbytes} bytes, but the archive holds "
                                      f"{'no such entry' if entry is None else f'{entry[1]} bytes'} for it; refused")
    elif sum(storages.values()) > size:
        raise UnsafeFileError(path, f"its storages declare {sum(storages.values())} bytes, more than the file's "
                              f"{size}; refused before allocating them")
    mmap = mmap and entries is not None  # torch's legacy (pre-1.6) format cannot be memory-mapped
    try:
        with torch.serialization.safe_globals(_deepspeed_classes()):
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable; say which and why
        text = str(err)
        if "Weights only load failed" in text or isinstance(err, pickle.UnpicklingError):
            culprit = next((g for g in named_globals(path) if g not in _torch_allowed()), None)
            if culprit:
                raise _refusal(path, culprit) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        first = next((ln.split("error:", 1)[1].strip() for ln in lines if "WeightsUnpickler error:" in ln),
                     lines[0] if lines else type(err).__name__)
        raise UnsafeFileError(path, f"not a readable torch file ({type(err).__name__}: {first}; truncated "
                              f"or not written by torch.save?)") from None
    try:
        check_layout(obj, path, size)
    except TensorCheckError as err:
        raise UnsafeFileError(path, str(err)[len(f"{path}: "):]) from None
    return obj


def _torch_allowed() -> set[str]:
    names = set(DEEPSPEED_GLOBALS)
    try:  # torch's own allow-list: only to pick the culprit to name when torch refuses what the scan let by
        from torch import _weights_only_unpickler
        names |= set(_weights_only_unpickler._get_allowed_globals())
    except Exception:  # noqa: BLE001
        pass
    return names


# The only files of a tag directory that are not torch files, at its top level only: read by ds_face as bounded
# JSON, never unpickled. Every other file, at any depth, is a file some library may torch.load.
PLAIN_FILES = ("ds_face_meta.json",)
MAX_TAG_ENTRIES = 100_000  # files and folders under one tag (a universal checkpoint holds a few per parameter)
MAX_TAG_DEPTH = 8


def tag_files(tag_dir: str | os.PathLike) -> list[Path]:
    """Every regular file under ``tag_dir``, at any depth, that is not one of ``PLAIN_FILES`` at its top level:
    all that DeepSpeed or torch could unpickle from it (``load_universal`` reads ``zero/<param>/*.pt``, other
    features other names). Links, devices, fifos and sockets are refused by name, anywhere: a checkpoint is
    regular files in directories. Raises UnsafeFileError."""
    tag_dir = Path(tag_dir)
    files: list[Path] = []
    pending, seen = [(tag_dir, 0)], 0
    while pending:
        folder, depth = pending.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            raise UnsafeFileError(folder, f"cannot list it ({err.strerror or err})") from None
        for entry in entries:
            path = Path(entry.path)
            seen += 1
            if seen > MAX_TAG_ENTRIES:
                raise UnsafeFileError(tag_dir, f"holds more than {MAX_TAG_ENTRIES} files and folders; not a "
                                      f"checkpoint ds_face or DeepSpeed wrote")
            if entry.is_symlink():
                raise UnsafeFileError(path, f"a symbolic link (to {os.readlink(path)!r}) inside a checkpoint; "
                                      f"refused: a checkpoint is regular files, and a link can point anywhere")
            if entry.is_dir(follow_symlinks=False):
                if depth + 1 > MAX_TAG_DEPTH:
                    raise UnsafeFileError(path, f"folders nested deeper than {MAX_TAG_DEPTH} levels in "
                                          f"{tag_dir}; not a checkpoint ds_face or DeepSpeed wrote")
                pending.append((path, depth + 1))
            elif not entry.is_file(follow_symlinks=False):
                raise UnsafeFileError(path, "not a regular file (a device, fifo or socket) inside a checkpoint; "
                                      "refused")
            elif not (depth == 0 and entry.name in PLAIN_FILES):
                files.append(path)
    return sorted(files)


def check_checkpoint_dir(tag_dir: str | os.PathLike, inspect: Callable[[Path, Any], None] | None = None) \
        -> list[Path]:
    """Pass every file of a DeepSpeed tag directory, at any depth, through the weights-only loader; returns them.

    Default deny: a file is either one of ``PLAIN_FILES`` (top level) or it must load weights-only, whatever its
    name or folder (``tag_files``). Call it before ``engine.load_checkpoint`` or ``zero_to_fp32`` (which
    unpickle with ``weights_only=False``). Raises UnsafeFileError for the first file refused. Cheap:
    memory-mapped, only each file's pickle is parsed. ``inspect(path, obj)``, if given, sees each loaded file
    (range checks of what it holds) before the next is read.
    """
    files = tag_files(tag_dir)
    for path in files:
        obj = load_weights_only(path, mmap=True)
        if inspect is not None:
            inspect(path, obj)
        del obj
    return files


# -- counts read from a checkpoint's ds_face_meta.json ---------------------------------------------

MAX_COUNT = 2**53  # steps, samples, classes: far above any run, and exact as a JSON number


def check_meta_counts(meta: dict, tag_dir: str | os.PathLike, meta_name: str = "ds_face_meta.json") -> None:
    """Range-check the values in ``ds_face_meta.json`` before anything uses them: ``world_size`` (a positive int,
    at most the number of files there: every rank wrote its head file), ``num_classes`` / ``embedding_size`` /
    ``micro_batch`` / ``accumulation`` (positive ints), ``global_step`` / ``epoch`` / ``samples_seen`` (ints >= 0),
    every one at most 2**53; and what a save writes holds together: each step and each epoch took at least one
    sample, ``global_batch`` (if there) is world size x micro-batch x accumulation, the saved config's ``seed`` is
    one a run accepts. Raises ValueError naming the file and the key. (``world_size: 10**10`` once made resume and
    export loop over ranks that never existed, with growing memory.)
    """
    from ds_face.config.schema import MAX_SEED
    tag_dir = Path(tag_dir)
    path = tag_dir / meta_name
    files = sum(1 for _ in tag_dir.iterdir())

    def integer(key: str, low: int, high: int = MAX_COUNT, where: dict = meta):
        value = where.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{path}: '{key}' must be an integer >= {low}, got {value!r}")
        if value > high:
            raise ValueError(f"{path}: '{key}' is {value}, more than {high}: corrupt or forged")
        return value

    world = integer("world_size", 1)
    if world > files:
        raise ValueError(f"{path}: 'world_size' is {world}, but {tag_dir} holds only {files} files (each rank "
                         f"writes its own head file): corrupt or forged")
    integer("num_classes", 1)
    integer("embedding_size", 1)
    step, epoch = integer("global_step", 0), integer("epoch", 0)
    if "samples_seen" in meta:
        samples = integer("samples_seen", 0)
        if step > samples or epoch > samples:
            raise ValueError(f"{path}: 'global_step' {step} and 'epoch' {epoch} cannot exceed 'samples_seen' "
                             f"{samples} (every step and every epoch takes at least one sample): corrupt or forged")
    if "micro_batch" in meta and "accumulation" in meta:
        batch = integer("micro_batch", 1, 2**31) * integer("accumulation", 1, 2**31) * world
        if "global_batch" in meta and meta["global_batch"] != batch:
            raise ValueError(f"{path}: 'global_batch' is {meta['global_batch']!r}, but world_size x micro_batch x "
                             f"accumulation is {batch}: corrupt or forged")
    config = meta.get("config")
    if isinstance(config, dict) and "seed" in config:
        integer("seed", 0, MAX_SEED, where=config)
