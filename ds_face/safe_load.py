"""The one way ds_face reads a torch file: weights-only, so that a file can hold data but never run code.

``torch.load(weights_only=True)`` rebuilds tensors, containers and plain values, and refuses every other
global a pickle names (``os.system``, ``builtins.exec``, ``subprocess.Popen``, any class). DeepSpeed 0.19.8's
own checkpoint files hold a few of its objects besides tensors; exactly those are allowed
(``DEEPSPEED_GLOBALS``, found by saving real checkpoints at ZeRO 0/1/2/3 in fp32, bf16 and fp16 and listing
what the weights-only loader refused). Each is rebuilt from data alone (an Enum looked up by value, plain
objects whose ``__dict__`` is filled in): nothing in them runs code from the file.

DeepSpeed itself loads its files with ``weights_only=False`` (``engine.load_checkpoint`` on resume,
``zero_to_fp32`` on export). ``check_checkpoint_dir`` therefore passes every ``*.pt`` of a tag directory
through the weights-only loader first (memory-mapped: only the pickle is read, not the tensor data); a
refused file stops everything before DeepSpeed unpickles anything.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

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
    """The pickle inside a torch file: ``<archive>/data.pkl`` of the zip format, else the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            return archive.read(name) if name else b""
    with open(path, "rb") as f:
        return f.read(1 << 20)  # a legacy file's first pickle (magic number, protocol, sys info) comes first


def named_globals(path: str | os.PathLike) -> list[str]:
    """The globals a pickle names, as ``module.name`` (Python 2 names mapped as the unpickler maps them).

    A static reading of the opcodes: nothing is resolved or called. Used only to say *what* a refused file
    wanted; the refusal itself is torch's weights-only unpickler.
    """
    import _compat_pickle
    import pickletools
    found, strings, memo = [], [], {}
    try:
        for op, arg, _ in pickletools.genops(_pickle_bytes(Path(path))):
            if op.name in ("GLOBAL", "INST"):
                module, name = arg.split(" ", 1)
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                module, name = strings[-2], strings[-1]
            else:
                if isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                    strings.append(arg)
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                    strings.append(memo[arg])
                continue
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            found.append(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}")
    except Exception:  # noqa: BLE001 - a damaged pickle: report what was read up to there
        pass
    return found


def _is_pickle(path: Path) -> bool:
    """Whether the file's pickle parses as opcodes at all (garbage and truncated files do not)."""
    import pickletools
    try:
        data = _pickle_bytes(path)
        return bool(data) and all(True for _ in pickletools.genops(data))
    except Exception:  # noqa: BLE001
        return False


def _allowed_names() -> set[str]:
    names = set(DEEPSPEED_GLOBALS)
    try:  # torch's own allow-list (tensor rebuilders, OrderedDict, ...): only to pick the culprit to name
        from torch import _weights_only_unpickler
        names |= set(_weights_only_unpickler._get_allowed_globals())
    except Exception:  # noqa: BLE001
        pass
    return names


def load_weights_only(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's few checkpoint types allowed.

    Raises UnsafeFileError naming the file: missing, not a torch file, or (the point) a pickle that names a
    global outside the allow-list, e.g. ``posix.system``; that global is never called.
    ``mmap=True`` maps the tensor data instead of reading it (zip-format files; others are read).
    """
    import torch
    path = Path(path)
    if not path.is_file():
        raise UnsafeFileError(path, "no such file")
    mmap = mmap and zipfile.is_zipfile(path)  # torch's legacy (pre-1.6) format cannot be memory-mapped
    try:
        with torch.serialization.safe_globals(_deepspeed_classes()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable; say which and why
        text = str(err)
        refused = None
        if "Weights only load failed" in text or isinstance(err, pickle.UnpicklingError):
            allowed = _allowed_names()
            refused = next((g for g in named_globals(path) if g not in allowed), None)
        if refused or ("Unsupported" in text and _is_pickle(path)):  # a real pickle asking for more than data
            what = f"the global {refused}" if refused else "something other than tensors and plain values"
            raise UnsafeFileError(path, f"refused to load: it names {what}, which a weights-only load does not "
                                  f"allow (a checkpoint holds only tensors, plain values and "
                                  f"{len(DEEPSPEED_GLOBALS)} DeepSpeed types); this file may be malicious",
                                  refused) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        first = next((ln.split("error:", 1)[1].strip() for ln in lines if "WeightsUnpickler error:" in ln),
                     lines[0] if lines else type(err).__name__)
        raise UnsafeFileError(path, f"not a readable torch file ({type(err).__name__}: {first}; truncated "
                              f"or not written by torch.save?)") from None


def check_checkpoint_dir(tag_dir: str | os.PathLike) -> list[Path]:
    """Pass every ``*.pt`` in a DeepSpeed tag directory through the weights-only loader; returns them.

    Call it before ``engine.load_checkpoint`` or ``zero_to_fp32`` (which unpickle with
    ``weights_only=False``). Raises UnsafeFileError for the first file refused. Cheap: memory-mapped, only
    each file's pickle is parsed.
    """
    tag_dir = Path(tag_dir)
    files = sorted(p for p in tag_dir.glob("*.pt") if not p.is_dir())
    for path in files:
        load_weights_only(path, mmap=True)
    return files


# -- counts read from a checkpoint's ds_face_meta.json ---------------------------------------------

def check_meta_counts(meta: dict, tag_dir: str | os.PathLike, meta_name: str = "ds_face_meta.json") -> None:
    """Bound the counts in ``ds_face_meta.json`` by what the tag directory really holds, before any loop uses
    them: ``world_size`` (a positive int, at most the number of files there: every rank wrote its head file),
    ``num_classes`` / ``embedding_size`` (positive ints), ``global_step`` / ``epoch`` (ints >= 0).
    Raises ValueError naming the file and the key. (``world_size: 10**10`` once made resume and export
    loop over ranks that never existed, with growing memory.)
    """
    tag_dir = Path(tag_dir)
    path = tag_dir / meta_name
    files = sum(1 for _ in tag_dir.iterdir())

    def integer(key: str, low: int):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{path}: '{key}' must be an integer >= {low}, got {value!r}")
        return value

    world = integer("world_size", 1)
    if world > files:
        raise ValueError(f"{path}: 'world_size' is {world}, but {tag_dir} holds only {files} files (each rank "
                         f"writes its own head file): corrupt or forged")
    integer("num_classes", 1)
    integer("embedding_size", 1)
    integer("global_step", 0)
    integer("epoch", 0)
