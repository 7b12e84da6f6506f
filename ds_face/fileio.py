"""Writing the files users keep (manifests, checkpoints, reports): atomically and durably.

The file is written aside as `<name>.partial`, fsynced, renamed over `<name>`, and the directory fsynced:
a reader sees the old file or the complete new one, also after a crash or a power loss.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

PARTIAL = ".partial"


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file's data, or a directory's entries (after a rename in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[Path], None], durable: bool = True) -> None:
    """`data`: the bytes, or a function that writes the file it is given (e.g. ``lambda p: torch.save(x, p)``).
    `durable=False` skips the fsyncs (a disk flush each) where losing the file in a power cut costs nothing."""
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL)
    if callable(data):
        data(tmp)
    else:
        tmp.write_bytes(data)
    if durable:
        fsync_path(tmp)
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)


def write_json_atomic(path: str | os.PathLike, obj: Any, durable: bool = True) -> None:
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode(), durable)
