"""A dataset directory in object storage (``s3://bucket/prefix``, or any other fsspec protocol: ``gs://``,
``az://``, ...), read and written through the protocol's own client (s3fs for S3), never by hand-written HTTP.

Credentials and endpoints come from the client's standard environment and config files (for S3:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or ``~/.aws``, ``AWS_ENDPOINT_URL_S3`` for an S3-compatible
store), never from a run YAML, so nothing secret is ever written into ``output.dir/config.yaml``.

Every call goes through ``Store.call``: an error the client raises for a connection or a timeout is retried
with exponential backoff (each retry counted) until the store has been unreachable for ``outage_s`` seconds,
then ``StoreError`` names the store and how long it was tried. Any other error (a missing object, a refused
credential) is not retried. File names are plain names under the prefix (``shards.confined``'s rule), so
nothing a manifest says can reach outside the dataset's prefix.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass

log = logging.getLogger("ds_face")

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# What a client raises when the store cannot be reached or answers too late (class names along the MRO:
# botocore's EndpointConnectionError / ConnectTimeoutError / ReadTimeoutError, aiohttp's ClientConnectorError
# and ServerDisconnectedError, the builtins ConnectionError and TimeoutError). Everything else is final.
_TRANSIENT = re.compile(r"Connection|Timeout|Disconnected|ServiceUnavailable|SlowDown|IncompleteRead")


def plain_name_problem(name) -> str | None:
    """Why ``name`` is not a plain file name as data_prep writes it (``data-00000-of-00008.arrow``), or None:
    a dataset's files, local or in a store, are plain names inside its directory or prefix."""
    if not isinstance(name, str) or not name:
        return f"must be a file name, got {name!r}"
    if "/" in name or "\\" in name or os.sep in name or (os.altsep and os.altsep in name):
        return f"{name!r} is a path; shards must be plain file names inside the dataset directory"
    if name in (".", "..") or "\0" in name:
        return f"{name!r} is not a file name"
    return None


def is_remote(path) -> bool:
    """``s3://...``, ``gs://...``: a URL of a protocol other than ``file``."""
    text = str(path)
    return bool(_URL.match(text)) and not text.lower().startswith("file://")


class StoreError(ValueError):
    """The store cannot give what the run needs; the message names the object and the store."""


def transient(error: BaseException) -> bool:
    if isinstance(error, (FileNotFoundError, PermissionError)):
        return False
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        _TRANSIENT.search(cls.__name__) for cls in type(error).__mro__)


@dataclass
class StoreStats:
    """What this process asked of the store (the loader's log: bytes per sample, retries)."""
    calls: int = 0
    retries: int = 0
    bytes_fetched: int = 0


class Store:
    def __init__(self, url: str, outage_s: float = 600.0):
        import fsspec  # the protocol's client: s3fs for s3://, gcsfs for gs://, adlfs for az://
        self.url = str(url).rstrip("/")
        self.outage_s = outage_s
        try:
            # a client of its own: fsspec's shared instances are keyed by arguments, not by the environment that
            # names the endpoint and credentials
            self._fs, self.root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **self.client_options())
        except (ImportError, ValueError) as err:
            raise StoreError(f"{self.url}: no client for this protocol ({err}); for s3:// install s3fs "
                             f"(requirements.txt), for gs:// gcsfs, for az:// adlfs") from None
        self._pid = os.getpid()
        self.stats = StoreStats()

    def client_options(self) -> dict:
        """For S3, botocore's own retries off: after s3fs's quick ones (5 tries within about a second), the
        retries are ours, counted and bounded by ``outage_s``. Other protocols keep their clients' retries,
        then ours on top."""
        if self.url.lower().startswith(("s3://", "s3a://")):
            return {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}
        return {}

    @property
    def fs(self):
        """The client of this process: a DataLoader worker forked from a rank makes its own (an async client's
        event loop and connections do not survive a fork)."""
        if self._pid != os.getpid():
            import fsspec
            self._fs = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **self.client_options())[0]
            self._pid = os.getpid()
        return self._fs

    def __repr__(self) -> str:
        return f"Store({self.url})"

    def where(self, name: str) -> str:
        if problem := plain_name_problem(name):
            raise StoreError(f"{self.url}: {problem}")
        return f"{self.url}/{name}"

    def call(self, what: str, function, *args, **kwargs):
        """``function(*args, **kwargs)``, retried while the store is unreachable (at most ``outage_s``)."""
        started, wait = time.monotonic(), 0.5
        while True:
            self.stats.calls += 1
            try:
                return function(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - classified: transient errors retried, the rest raised
                waited = time.monotonic() - started
                if not transient(error):
                    raise
                if waited + wait > self.outage_s:
                    raise StoreError(f"{what}: the store has not answered for {waited:.0f} s ({type(error).__name__}: "
                                     f"{error}); data.store_outage_minutes is {self.outage_s / 60:g}") from None
                self.stats.retries += 1
                log.warning(f"{what}: {type(error).__name__}: {error}; retry {self.stats.retries} in {wait:.1f} s")
                time.sleep(wait)
                wait = min(wait * 2, 30.0)
                self.fs.invalidate_cache()

    def _path(self, name: str) -> str:
        self.where(name)
        return f"{self.root}/{name}"

    def list(self) -> dict[str, int | None]:
        """Plain name -> size (None: not a file) of everything directly under the prefix, as the store holds it
        now (the client's cached listing dropped first); {} when nothing is there."""
        self.fs.invalidate_cache(self.root)
        try:
            entries = self.call(self.url, self.fs.ls, self.root, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: (int(e["size"]) if e.get("type") == "file" else None)
                for e in entries}

    def remove(self, names: list[str]) -> None:
        """Delete these objects in one request (S3: DeleteObjects)."""
        paths = [self._path(name) for name in names]
        if paths:
            self.call(self.url, self.fs.rm, paths)

    def size(self, name: str) -> int | None:
        """The object's size in bytes, None if there is none."""
        path = self._path(name)
        try:
            info = self.call(self.where(name), self.fs.info, path)
        except FileNotFoundError:
            return None
        if info.get("type") not in (None, "file"):
            raise StoreError(f"{self.where(name)}: a {info.get('type')}, not a file")
        return int(info["size"])

    def read(self, name: str, limit: int) -> bytes:
        """The whole object, refused if it is larger than ``limit`` bytes (asked before reading)."""
        size = self.size(name)
        if size is None:
            raise FileNotFoundError(self.where(name))
        if size > limit:
            raise StoreError(f"{self.where(name)}: {size} bytes, more than the {limit} allowed")
        data = self.call(self.where(name), self.fs.cat_file, self._path(name), start=0, end=limit + 1)
        if len(data) != size:
            raise StoreError(f"{self.where(name)}: changed while it was read ({len(data)} bytes, then {size})")
        self.stats.bytes_fetched += len(data)
        return data

    def fetch(self, name: str, out, expected_bytes: int, sha256: str | None, chunk: int = 8 << 20) -> None:
        """Copy the object into the open binary file ``out`` in chunks (a retry starts the copy over),
        checking its size before and its size and sha256 (if given) after: a shard that changed in the store
        since the manifest was written is named, never used."""
        where, path = self.where(name), self._path(name)

        def copy():
            out.seek(0)
            out.truncate()
            digest, copied = hashlib.sha256(), 0
            with self.fs.open(path, "rb", block_size=chunk) as source:
                while block := source.read(min(chunk, expected_bytes + 1 - copied)):
                    out.write(block)
                    digest.update(block)
                    copied += len(block)
                    if copied > expected_bytes:
                        break
            return copied, digest.hexdigest()

        size = self.size(name)
        if size is None:
            raise StoreError(f"{where}: listed in the manifest, not in the store")
        if size != expected_bytes:
            raise StoreError(f"{where}: {size} bytes in the store, the manifest says {expected_bytes}: the "
                             f"shard changed in the store since the dataset was written")
        copied, got = self.call(where, copy)
        self.stats.bytes_fetched += copied
        if copied != expected_bytes:
            raise StoreError(f"{where}: {copied} bytes read, the manifest says {expected_bytes}: the shard "
                             f"changed in the store while it was read")
        if sha256 is not None and got != sha256:
            raise StoreError(f"{where}: sha256 {got}, the manifest says {sha256}: the shard changed in the store "
                             f"since the dataset was written")

    def put_file(self, local_path: str, name: str) -> None:
        """Upload a local file as ``name`` (the client writes the object whole: readers never see part of it)."""
        path = self._path(name)
        self.call(self.where(name), self.fs.put_file, str(local_path), path)

    def put_bytes(self, name: str, data: bytes) -> None:
        self.call(self.where(name), self.fs.pipe_file, self._path(name), data)
