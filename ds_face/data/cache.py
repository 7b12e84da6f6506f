"""This node's copies of a remote dataset's shards: a bounded local cache that every rank of the node shares.

``ShardCache.get(i)`` returns the local path of shard ``i``, fetching it first if it is not there. A shard
arrives written aside (``AtomicFile``: a fresh ``.partial`` name, renamed into place), its size and sha256
checked against the manifest on the way in (``Store.fetch``): a partial download is never read, and a shard
that changed in the store is named, never used. Then it is read like a local shard (``open_shard``: every
check of today). One process of the node downloads a given shard (a lock file per shard); the others wait
for it and read the same file. Nodes share nothing.

The cache holds at most ``budget`` bytes of shards: to make room it removes the shards used least recently
(the file's mtime, touched at every use), never one the run needs in the next steps (``keep``), and refuses
rather than exceed the budget. The loader says which shards the coming steps read, in the run's own order
(``Prefetcher``), so that most fetches happen before a worker needs the shard. Removing a shard that a
process still has memory-mapped is safe on Linux (the mapping keeps the pages); its disk space is freed when
the last mapping goes, so the disk may briefly hold more than the budget.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import stat
import threading
from pathlib import Path

from ds_face.config.bounded import read_at_most
from ds_face.data.store import Store, StoreError
from ds_face.fileio import AtomicFile

log = logging.getLogger("ds_face")
VERIFIED = ".sha256"  # beside each complete shard: the sha256 it was checked against on arrival


class ShardCache:
    def __init__(self, store: Store, manifest, cache_dir: str | os.PathLike, budget: int):
        self.store, self.manifest, self.budget = store, manifest, budget
        # one directory per dataset URL: two datasets never share a file name's meaning
        self.directory = Path(cache_dir) / hashlib.sha256(store.url.encode()).hexdigest()[:16]
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"data.cache_dir: cannot make {self.directory} ({err.strerror})") from None
        if self.directory.is_symlink() or not self.directory.is_dir():
            raise StoreError(f"data.cache_dir: {self.directory} is not a directory of its own (a link?)")
        self.keep: set[str] = set()  # shard files the coming steps read: never evicted
        self.hits = self.misses = 0

    # -- one shard ------------------------------------------------------------------------------------
    def get(self, shard: int) -> str:
        """The local path of shard ``shard``, fetched first when this node does not hold it (a reader: room is
        made by evicting any shard but the current step's)."""
        return self._get(shard, protect=set(), must=True)

    def prefetch(self, shard: int, protect: set[str]) -> bool:
        """Fetch shard ``shard`` ahead of need if room can be made without evicting the current step's shards
        or ``protect`` (the shards of the steps before it); False when it cannot yet."""
        return self._get(shard, protect, must=False) is not None

    def _get(self, shard: int, protect: set[str], must: bool) -> str | None:
        info = self.manifest.shards[shard]
        target = self.directory / info.file
        if self._cached(target, info, must):
            return str(target)
        with self._locked(f"{info.file}.lock"):  # one process of the node fetches it; the rest wait, then read
            if self._cached(target, info, must):  # another process fetched it while we waited
                return str(target)
            if not self._make_room(info.bytes, info.file, self.keep | protect, must):
                return None
            self.misses += must
            for stale in self.directory.glob(f"{info.file}.*.partial"):  # a crashed fetch's (we hold the lock)
                stale.unlink(missing_ok=True)
            with AtomicFile(target, durable=False) as out:
                self.store.fetch(info.file, out, info.bytes, info.sha256)
            _write_small(self.directory / (info.file + VERIFIED), info.sha256)
        return str(target)

    def _cached(self, target: Path, info, reader: bool) -> bool:
        """Here and complete: counted as a reader's hit, and marked as just used (the eviction order)."""
        if not self._complete(target, info):
            return False
        self.hits += reader
        _touch(target)
        return True

    def _complete(self, target: Path, info) -> bool:
        """Here whole and checked against this manifest's sha256 (a cached copy of another version is not)."""
        try:
            st = os.lstat(target)  # the shard itself, never a link's target
            sidecar = read_at_most(self.directory / (info.file + VERIFIED), 64, follow_links=False)
        except OSError:  # missing, a link (ELOOP), not a regular file: not a shard we fetched
            return False
        return stat.S_ISREG(st.st_mode) and st.st_size == info.bytes and sidecar == info.sha256.encode()

    # -- the budget ---------------------------------------------------------------------------------
    def _make_room(self, nbytes: int, arriving: str, protect: set[str], must: bool) -> bool:
        """Evict least recently used shards (never ``protect``) until ``nbytes`` more fit the budget."""
        with self._locked(".lock"):
            held = []
            for path in self.directory.glob("*.arrow"):
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(path)
                    held.append((st.st_mtime_ns, path.name, st.st_size))
            total = sum(size for _, _, size in held)
            evictable = [(name, size) for _, name, size in sorted(held) if name not in protect]
            if total - sum(size for _, size in evictable) + nbytes > self.budget:
                if not must:
                    return False
                raise StoreError(f"data.cache_gb: {self.budget / 2**30:.3g} GiB cannot hold {arriving} "
                                 f"({nbytes / 2**30:.3g} GiB) beside the shards this step reads "
                                 f"({self.directory}); raise data.cache_gb")
            for name, size in evictable:  # least recently used first
                if total + nbytes <= self.budget:
                    break
                (self.directory / name).unlink(missing_ok=True)
                (self.directory / (name + VERIFIED)).unlink(missing_ok=True)
                total -= size
            return True

    @contextlib.contextmanager
    def _locked(self, name: str):
        with _OPEN_LOCKS_GUARD:  # opened and recorded at once: a fork sees both or neither
            fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            _OPEN_LOCKS.add(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            with _OPEN_LOCKS_GUARD:
                _OPEN_LOCKS.discard(fd)
                os.close(fd)


# A flock belongs to the open file, which a fork shares: a DataLoader worker forked while the prefetcher holds
# a shard's lock would keep it held after the prefetcher lets go, and wait forever when it needs that shard
# itself. So a forked child closes its copies of the lock files open at the fork (it holds none of the locks).
_OPEN_LOCKS: set[int] = set()
_OPEN_LOCKS_GUARD = threading.Lock()


def _close_inherited_locks() -> None:
    for fd in _OPEN_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _OPEN_LOCKS.clear()
    _OPEN_LOCKS_GUARD.release()


os.register_at_fork(before=_OPEN_LOCKS_GUARD.acquire, after_in_parent=_OPEN_LOCKS_GUARD.release,
                    after_in_child=_close_inherited_locks)


class Prefetcher:
    """A thread that fetches the shards of the coming steps in the order the run reads them, at most ``ahead``
    steps ahead of the reader, each shard once, and only into room it can make without evicting what the
    reader or an earlier coming step needs (it waits for the reader otherwise). Its errors are left to the
    readers: a reader that needs a shard the prefetcher could not fetch fetches it itself, and says why."""

    def __init__(self, cache: ShardCache, upcoming, ahead: int):
        self.cache, self.upcoming, self.ahead = cache, upcoming, ahead
        self.reading = 0  # the step the reader is at
        self.changed = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="ds_face-prefetch", daemon=True)
        self.thread.start()

    def advance(self, step: int, shards: list[int]) -> None:
        """The reader is at ``step``, which reads ``shards``: they are never evicted while it does."""
        with self.changed:
            self.reading = step
            self.cache.keep = {self.cache.manifest.shards[s].file for s in shards}
            self.changed.notify_all()

    def stop(self) -> None:
        with self.changed:
            self.stopped = True
            self.changed.notify_all()

    def _run(self) -> None:
        window: dict[int, list[str]] = {}  # coming step -> its shard files
        try:
            for step, shards in self.upcoming:
                window[step] = [self.cache.manifest.shards[s].file for s in shards]
                for shard in shards:
                    while True:
                        with self.changed:
                            self.changed.wait_for(lambda: self.stopped or step <= self.reading + self.ahead)
                            if self.stopped:
                                return
                            reading = self.reading
                        window = {k: v for k, v in window.items() if k >= reading}
                        protect = {f for k, files in window.items() if k <= step for f in files}
                        if self.cache.prefetch(shard, protect):
                            break
                        with self.changed:  # no room yet: wait for the reader to move on
                            self.changed.wait_for(lambda: self.stopped or self.reading != reading)
        except Exception as err:  # noqa: BLE001 - the reader that needs the shard raises it, named
            log.warning(f"prefetching stopped: {err}")


def _touch(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.utime(path, follow_symlinks=False)


def _write_small(path: Path, text: str) -> None:
    with AtomicFile(path, durable=False) as out:
        out.write(text.encode())
