"""The one writer of the files ds_face and data_prep write (checkpoints, configs, manifests, shards, reports,
embeddings): atomic, durable, and never through a link it did not make.

A file is written aside into a FRESH temporary in the same directory, ``<name>.<12 hex>.partial``, created
exclusively and without following links (O_CREAT | O_EXCL | O_NOFOLLOW): whatever already lies at any name
(a planted ``config.yaml.partial`` symlink, a leftover) is never opened, let alone written through. The data is
fsynced and the temporary renamed over ``<name>``; a rename replaces a link at ``<name>`` itself, never what it
points to. Every step is relative to one descriptor of the directory, opened once, so the file lands in that
directory even if a path component is swapped meanwhile. The directory is then fsynced: a reader sees the old file
or the complete new one, also after a crash or a power loss.

Callers that produce the bytes with a library (``torch.save``, ``fig.savefig``, ``np.save``, an Arrow writer) are
handed the open file object, never a path.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, BinaryIO, Callable

PARTIAL = ".partial"
_TEMPORARY = re.compile(r"^(?P<name>.+)\.[0-9a-f]{12}\.partial\Z")
log = logging.getLogger("ds_face")


class WriteError(OSError):
    """A write refused before anything was written (the message names the path); one line, no traceback."""

    def __str__(self) -> str:
        return self.args[0]


def final_name(name: str) -> str | None:
    """The name a temporary of this writer stands aside for (``a.json.0123456789ab.partial`` -> ``a.json``)."""
    match = _TEMPORARY.match(name)
    return match.group("name") if match else None


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file's data, or a directory's entries (after a rename in it). Reads nothing, writes nothing."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """``path`` being written: ``.file`` is the open temporary; ``commit()`` puts it in place, ``discard()`` drops
    it. As a context manager: committed if the block ends normally, discarded if it raises."""

    def __init__(self, path: str | os.PathLike, durable: bool = True, sync_dir: bool | None = None):
        self.path, self.durable = Path(path), durable
        self.sync_dir = durable if sync_dir is None else sync_dir
        if self.path.name in ("", ".", ".."):
            raise WriteError(f"{self.path}: not a file name to write")
        try:
            self.dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise WriteError(f"{self.path}: cannot write in {self.path.parent} ({err.strerror})") from None
        self.temp = f"{self.path.name}.{secrets.token_hex(6)}{PARTIAL}"
        try:
            fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=self.dir_fd)
        except FileExistsError:  # a fresh random name taken: someone predicted it; write nothing
            os.close(self.dir_fd)
            raise WriteError(f"{self.path.parent / self.temp}: something is already at this fresh temporary name "
                             f"(planted?); {self.path} not written") from None
        except OSError as err:  # a read-only or full directory: one line, nothing written
            os.close(self.dir_fd)
            raise WriteError(f"{self.path}: cannot write in {self.path.parent} ({err.strerror}); nothing "
                             f"was written") from None
        except BaseException:
            os.close(self.dir_fd)
            raise
        self.file: BinaryIO = os.fdopen(fd, "wb")
        self.done = False

    def commit(self) -> None:
        try:
            self.file.flush()
            if self.durable:
                os.fsync(self.file.fileno())
            self.file.close()
            self._say_if_link()
            os.replace(self.temp, self.path.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except BaseException:  # a full disk, say: the temporary goes, the old file stays
            self.discard()
            raise
        if self.sync_dir:
            os.fsync(self.dir_fd)
        self._close()

    def _say_if_link(self) -> None:
        try:
            if stat.S_ISLNK(os.lstat(self.path.name, dir_fd=self.dir_fd).st_mode):
                log.warning(f"{self.path}: was a symbolic link (to {os.readlink(self.path.name, dir_fd=self.dir_fd)}); "
                            f"replaced by the file itself, the link's target untouched")
        except FileNotFoundError:
            pass

    def discard(self) -> None:
        if self.done:
            return
        try:
            self.file.close()
        except OSError:  # its buffer could not be flushed (a full disk): the file goes anyway
            pass
        try:
            os.unlink(self.temp, dir_fd=self.dir_fd)
        except FileNotFoundError:
            pass
        self._close()

    def _close(self) -> None:
        if not self.done:
            self.done = True
            os.close(self.dir_fd)

    def __enter__(self) -> BinaryIO:
        return self.file

    def __exit__(self, kind, value, traceback) -> None:
        self.commit() if kind is None else self.discard()


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[BinaryIO], None], durable: bool = True) -> None:
    """`data`: the bytes, or a function that writes into the open file it is given (``lambda f: torch.save(x, f)``).
    `durable=False` skips the fsyncs (a disk flush each) where losing the file in a power cut costs nothing."""
    with AtomicFile(path, durable) as f:
        data(f) if callable(data) else f.write(data)


def write_json_atomic(path: str | os.PathLike, obj: Any, durable: bool = True) -> None:
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode(), durable)


def remove_entry(path: str | os.PathLike) -> None:
    """Remove what is at ``path`` without following a link: a link or a file is unlinked (a link's target is
    untouched), a directory removed with its contents (shutil.rmtree does not follow the links inside)."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def fresh_dir(path: str | os.PathLike, keep: Callable[[Path], bool] = lambda p: False) -> Path:
    """Create the directory ``path`` anew (os.mkdir), so that what is written into it lands in a directory made
    here. Whatever is at that name first goes (a planted link: the link itself, never followed; a leftover file or
    directory), unless ``keep(path)`` says it must stay: then a WriteError names it."""
    path = Path(path)
    if os.path.lexists(path):
        if keep(path):
            raise WriteError(f"{path}: already exists and must be kept; not written")
        if os.path.islink(path):
            log.warning(f"{path}: a symbolic link (to {os.readlink(path)}) where a directory is to be made; "
                        f"removing the link, its target untouched")
        remove_entry(path)
    os.mkdir(path)
    return path


def real_dir(path: str | os.PathLike) -> Path:
    """``path`` as a directory to write into: made if missing (with its parents); a link (or anything but a
    directory) at that name is refused, named, so that nothing meant for it lands where the link points."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path)
    except FileExistsError:
        if os.path.islink(path) or not path.is_dir():
            what = f"a symbolic link (to {os.readlink(path)})" if os.path.islink(path) else "not a directory"
            raise WriteError(f"{path}: {what}, where ds_face writes into a directory of its own; remove it") from None
    return path
