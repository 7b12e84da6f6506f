"""Where the head's state lives: this rank's [num_local, D] tables (the class centres and their optimizer
state), kept on the accelerator (``device``), in host memory (``host``, pinned where the accelerator pins) or
in memory-mapped files on local disk (``disk``: the page cache is the cache, so neither the device nor the
process's own memory holds the slice). Stored as float32, bfloat16 or float16; read and written by row and
always computed on in float32 on the device.

The maths sees only ``read(name, rows)`` and ``write(name, rows, values)``: one code path for every storage,
and the checkpoint holds float32 slices whatever the storage (DESIGN.md invariant 9), so a run may resume
under another storage or dtype. With float32 storage the three give the same bits: the same index_select and
index_copy_ on the same values, only the tensor's home differs.

A ``disk`` rank's tables are scratch files in ``head.storage_dir`` (rebuilt from the initial values or the
checkpoint at every start), unlinked as soon as they are mapped, and allocated in full at the start so that a
disk that is too small or read-only says so before the first step, not in the middle of one.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ds_face.config import HEAD_STORAGE_DTYPES, HEAD_STORAGES as STORAGES

STORAGE_DTYPES = {name: getattr(torch, name) for name in HEAD_STORAGE_DTYPES}


class HeadStorageError(RuntimeError):
    pass


class HeadStore:
    """Named tables of ``rows`` rows each (``[rows, width]`` or ``[rows]``), kept where ``storage`` says."""

    def __init__(self, rows: int, storage: str = "device", dtype: str = "float32",
                 device: torch.device | str = "cpu", directory: str | Path | None = None, rank: int = 0):
        if storage not in STORAGES:
            raise ValueError(f"head.storage must be one of {STORAGES}, got {storage!r}")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"head.storage_dtype must be one of {tuple(STORAGE_DTYPES)}, got {dtype!r}")
        self.rows, self.storage, self.dtype_name = rows, storage, dtype
        self.dtype = STORAGE_DTYPES[dtype]
        self.device = torch.device(device)
        self.home = self.device if storage == "device" else torch.device("cpu")
        self.tables: dict[str, torch.Tensor] = {}
        if storage == "disk" and not directory:
            raise ValueError("head.storage disk needs a directory (head.storage_dir)")
        self.files = DiskTables(Path(directory), rank) if storage == "disk" else None

    def __repr__(self) -> str:
        where = f"disk {self.files.directory}" if self.files else self.storage
        return f"HeadStore({self.rows} rows, {self.dtype_name}, {where})"

    # -- tables ----------------------------------------------------------------------------------
    def add(self, name: str, width: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A new zero table (``width`` None: one value per row); floating tables take the storage dtype."""
        dtype = dtype or self.dtype
        shape = (self.rows,) if width is None else (self.rows, width)
        if self.files is not None:
            table = self.files.table(name, shape, dtype)
        else:
            table = torch.zeros(shape, dtype=dtype, device=self.home)
            if self.storage == "host":
                table = pin(table, self.device)
        self.tables[name] = table
        return table

    def whole(self, name: str) -> torch.Tensor:
        """The stored table itself (its storage dtype, where it lives): for checkpoints and inspection."""
        return self.tables[name]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tables.values())

    # -- rows --------------------------------------------------------------------------------------
    def read(self, name: str, rows: torch.Tensor | None) -> torch.Tensor:
        """Rows ``rows`` (None: all) of a table on the device, float32 for floating tables. A copy, except for a
        float32 table already on the device read whole: then an alias (the optimizer updates it in place)."""
        table = self.tables[name]
        values = table if rows is None else table.index_select(0, rows.to(self.home))
        if values.is_floating_point():
            values = values.to(self.device, torch.float32, non_blocking=True)
        else:
            values = values.to(self.device, non_blocking=True)
        return values.detach()

    def write(self, name: str, rows: torch.Tensor | None, values: torch.Tensor) -> None:
        """Store ``values`` (on the device, float32) as rows ``rows`` (None: all) of a table."""
        table = self.tables[name]
        if rows is None and values.data_ptr() == table.data_ptr():
            return  # the alias read() gave: already updated in place
        values = values.to(self.home, table.dtype)
        with torch.no_grad():
            if rows is None:
                table.copy_(values)
            else:
                table.index_copy_(0, rows.to(self.home), values)

    def fill(self, name: str, row: int, values: torch.Tensor) -> None:
        """Store ``values`` as rows ``row .. row + len(values)`` (initial values and checkpoint loads: slice by
        slice, so that no whole-table temporary is ever made)."""
        with torch.no_grad():
            self.tables[name][row:row + values.shape[0]].copy_(values)


def pin(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Page-locked host memory where the device's accelerator can copy from it asynchronously."""
    if device.type == "cpu":
        return table
    from deepspeed.accelerator import get_accelerator  # the accelerator's own pinning (CUDA, XPU, NPU, ...)
    return get_accelerator().pin_memory(table)


class DiskTables:
    """One rank's memory-mapped table files in ``directory``: each created under a fresh name (``mkstemp``:
    exclusive, never through a link), allocated in full (``posix_fallocate``), mapped, then unlinked at once.
    The mapping keeps the blocks while the process lives; when it ends, cleanly or by ``kill -9``, the kernel
    frees them: no stale file of a crashed run to find or clean, no name another run could collide with."""

    def __init__(self, directory: Path, rank: int):
        self.directory, self.rank = directory, rank

    def table(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        count = 1
        for size in shape:
            count *= size
        nbytes = max(count * dtype.itemsize, 1)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix=f"ds_face-head-rank{self.rank}-{name}-", suffix=".table",
                                        dir=self.directory)
        except OSError as error:
            raise HeadStorageError(f"head.storage_dir: cannot create rank {self.rank}'s {name!r} table in "
                                   f"{self.directory}: {error.strerror or error}") from error
        try:
            try:
                os.posix_fallocate(fd, 0, nbytes)  # every block now: a full disk fails here, not mid-step
            except OSError as error:
                free = os.statvfs(self.directory)
                raise HeadStorageError(
                    f"head.storage_dir: {self.directory} has {free.f_bavail * free.f_frsize / 2**30:.2f} GiB free, "
                    f"rank {self.rank}'s {name!r} table needs {nbytes / 2**30:.2f} GiB: {error.strerror}") from error
            # zero-filled, as the tables start; shared: pages are written back to the file, not copied on write
            return torch.from_file(path, shared=True, size=count, dtype=dtype).view(shape)
        finally:
            os.close(fd)
            os.unlink(path)
