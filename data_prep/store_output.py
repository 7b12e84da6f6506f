"""A conversion's output in object storage (``rec2arrow SRC s3://bucket/prefix``): the prefix's state, and the
uploads, in the order that keeps a reader and a resume safe.

The engine (`data_prep.convert`) converts into a local staging directory; each shard, once complete there, is
uploaded under its final name (an object PUT is atomic: no reader ever sees part of one), then its sidecar
``<shard>.done.json`` (rows, bytes, sha256, first/last planned index: the local ``.done/`` sidecar's bytes).
In the prefix, in order:

    plan.json                first, as in a local output directory
    data-*.arrow             each complete shard, then its sidecar data-*.arrow.done.json
    property, *.bin, ...     carried files
    manifest.json            last, once every shard is listed at the manifest's size; then the sidecars go

Re-running the same command resumes: a shard whose sidecar matches the plan and whose object has the sidecar's
size is neither converted nor uploaded again. A prefix holding anything else is refused, naming what is there.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from data_prep.plan import DONE_DIR, PLAN, OutputError, plan_difference
from ds_face.data.shards import MANIFEST, Manifest, ShardError, ShardInfo, check_shard_files
from ds_face.data.store import Store
from ds_face.fileio import write_json_atomic

SIDECAR = ".done.json"  # beside the shard: the store's names are plain names under the prefix
MAX_JSON_BYTES = 16 << 20  # plan.json and sidecars are a few KB; anything larger is not ours


def sidecar_name(shard: str) -> str:
    return f"{shard}{SIDECAR}"


class StoreOutput:
    def __init__(self, url: str):
        self.store = Store(url)
        self.url = self.store.url
        self.listed: dict[str, int | None] = {}  # name -> size (None: a "directory") at inspect()
        self.written: list[str] = []  # what this run put, for the clean-up of a bad input
        self.uploaded_bytes = 0

    def _list(self) -> dict[str, int | None]:
        return self.store.list()  # another process may have written since this client listed: listed afresh

    def _read_json(self, name: str):
        """The JSON object ``name``, or None when it is missing or not JSON (never half-written: a PUT is whole)."""
        try:
            return json.loads(self.store.read(name, MAX_JSON_BYTES))
        except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
            return None

    def inspect(self, plan: dict) -> str:
        """'fresh', 'resume' or 'finished' (the same plan, with a manifest); refuses (OutputError) a prefix that
        holds something else. A dataset in a store is never overwritten in place: there is no --overwrite."""
        self.listed = self._list()
        if not self.listed:
            return "fresh"
        old = self._read_json(PLAN) if self.listed.get(PLAN) is not None else None
        difference = plan_difference(old, plan) if isinstance(old, dict) else f"no {PLAN} beside it"
        if MANIFEST in self.listed:
            if isinstance(old, dict) and difference is None:
                return "finished"
            raise OutputError(f"{self.store.where(MANIFEST)}: the prefix already holds a finished dataset "
                              f"({difference}); a dataset in a store is never overwritten: choose a new prefix")
        if not isinstance(old, dict):
            raise OutputError(f"{self.store.where(sorted(self.listed)[0])}: the prefix is not empty and holds no "
                              f"conversion plan ({PLAN}); choose an empty or new prefix")
        if difference:
            raise OutputError(f"{self.url}: holds an unfinished conversion with other sources or options "
                              f"({difference}); rerun with the original sources and options to resume it, or "
                              f"choose a new prefix")
        return "resume"

    def put(self, local: Path, name: str) -> None:
        try:
            self.store.put_file(local, name)
        except FileNotFoundError as err:  # s3fs: the bucket does not exist
            raise OutputError(f"{self.store.where(name)}: cannot be written ({err}); does the bucket exist?") from None
        self.written.append(name)
        self.uploaded_bytes += local.stat().st_size

    def put_plan(self, plan: dict, staging: Path) -> None:
        write_json_atomic(staging / PLAN, plan, durable=False)  # the same bytes as a local output's plan.json
        self.put(staging / PLAN, PLAN)

    def kept(self, name: str, rows: int, first: int, last: int) -> ShardInfo | None:
        """The shard ``name`` already in the store, if its sidecar matches the plan and its object the sidecar's
        size (the sidecar is put after the shard, so it vouches for a whole upload), else None."""
        if self.listed.get(name) is None or self.listed.get(sidecar_name(name)) is None:
            return None
        meta = self._read_json(sidecar_name(name))
        if not isinstance(meta, dict) or (meta.get("rows"), meta.get("first_index"), meta.get("last_index")) != (
                rows, first, last):
            return None
        sha = meta.get("sha256")
        if meta.get("bytes") != self.listed[name] or not (isinstance(sha, str) and len(sha) == 64):
            return None
        return ShardInfo(name, rows, self.listed[name], sha)

    def publish(self, info: ShardInfo, staging: Path) -> None:
        """Upload a shard complete in ``staging``, then its sidecar; the local copy goes (disk is freed as the
        shards leave)."""
        self.put(staging / info.file, info.file)
        self.put(staging / DONE_DIR / f"{info.file}.json", sidecar_name(info.file))
        os.unlink(staging / info.file)

    def finish(self, manifest: Manifest, staging: Path) -> None:
        """The manifest, once every shard is in the store at its size; then the sidecars are removed."""
        try:
            check_shard_files(manifest, self.url)  # one listing: every shard there, of the manifest's size
        except ShardError as err:
            raise RuntimeError(f"{err}; the manifest was not written: rerun the same command to convert and "
                               f"upload that shard again") from None
        manifest.write(staging)
        self.put(staging / MANIFEST, MANIFEST)
        self.remove([sidecar_name(s.file) for s in manifest.shards])

    def remove(self, names: list[str]) -> None:
        listed = self._list()
        self.store.remove([name for name in names if name in listed])
