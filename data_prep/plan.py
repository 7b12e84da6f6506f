"""The conversion's plan (shard count, order, what plan.json pins) and the state of the output directory it is
written to: fresh, a resumable conversion of the same plan, a finished one, or one --overwrite may replace."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.source import Source
from ds_face import __version__
from ds_face.data.shards import MANIFEST
from ds_face.fileio import PARTIAL, final_name

PLAN = "plan.json"
DONE_DIR = ".done"
SHARD_FILE = re.compile(r"data-\d{5}-of-\d{5}\.arrow")

# Automatic shard count: shards of ~TARGET_SHARD_BYTES. The loader reads rows by random access from any shard,
# so the count no longer has to divide ranks x workers; per-shard costs (an fsync, a sidecar, small writes
# dealt over many files) are what make small shards slow (BENCHMARKS.md, "Conversion").
TARGET_SHARD_BYTES = 256 << 20
MIN_ROWS_PER_SHARD = 64
MAX_AUTO_SHARDS = 512  # past ~128 GB shards grow instead: every shard gets a batch from every chunk
# A chunk is dealt over all shards, so it grows with their number: ~1 MB per shard keeps record batches of
# ~200 images (smaller ones cost per-batch overhead), within 64-512 MB of memory (3 chunks in flight).
CHUNK_BYTES_PER_SHARD = 1 << 20
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 64 << 20, 512 << 20


class OutputError(ValueError):
    """The output directory is in a state the converter must not touch (foreign files, another conversion)."""


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (a crash can leave neither half-written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


# ---- planning ----

def choose_num_shards(num_samples: int, nbytes: int) -> int:
    """Shards of about TARGET_SHARD_BYTES, each of at least MIN_ROWS_PER_SHARD rows (one shard at least)."""
    by_bytes = min(-(-nbytes // TARGET_SHARD_BYTES), MAX_AUTO_SHARDS)
    return max(1, min(by_bytes, num_samples // MIN_ROWS_PER_SHARD))


def chunk_bytes_for(num_shards: int) -> int:
    return min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, num_shards * CHUNK_BYTES_PER_SHARD))


def describe_shard_count(num_shards: int, num_samples: int, nbytes: int) -> str:
    return f"{num_shards} shards of ~{num_samples / num_shards:.0f} rows (~{nbytes / num_shards / 1e6:.1f} MB)"


def shard_order(num_samples: int, order: str, seed: int | None) -> np.ndarray:
    """Source positions in shard order: shard i holds a contiguous run of this array. Shuffled: InsightFace .rec
    files are sorted by identity; every shard a uniform sample of the whole dataset mixes identities in any
    reader (ds_face's loader also mixes data.streams shards into every micro-batch)."""
    if order == "shuffled":
        return np.random.default_rng(seed).permutation(num_samples)
    return np.arange(num_samples)


def make_plan(source: Source, num_shards: int, order: str, seed: int | None) -> dict:
    return {"converter": f"{source.converter} {__version__}",
            "sources": source.files,
            "num_samples": len(source),
            "options": {"order": order, "seed": seed, "num_shards": num_shards},
            "carried": sorted(source.carried)}


def plan_difference(old: dict, new: dict) -> str | None:
    for key in ("converter", "sources", "num_samples", "options", "carried"):
        if old.get(key) != new[key]:
            if key == "sources":
                return _sources_difference(old.get(key) or [], new[key])
            return f"{key}: {json.dumps(old.get(key))} then, {json.dumps(new[key])} now"
    return None


def _sources_difference(old: list, new: list) -> str:
    old_by_file = {s.get("file"): s for s in old}
    for s in new:
        was = old_by_file.get(s["file"])
        if was is None:
            return f"source {s['file']} was not part of it"
        if was != s:
            changed = [k for k in s if was.get(k) != s[k]]
            return f"source {s['file']} changed since ({', '.join(changed)})"
    return f"sources: {[s.get('file') for s in old]} then, {[s['file'] for s in new]} now"


# ---- the output directory ----

def _is_owned(out: Path, name: str, carried: set[str]) -> bool:
    """Whether `name` in the output directory is something this converter writes."""
    base = final_name(name) or (name[:-len(PARTIAL)] if name.endswith(PARTIAL) else name)  # a writer's temporary
    if base in (PLAN, MANIFEST) or base in carried or SHARD_FILE.fullmatch(base):
        return True
    if name == DONE_DIR and (out / name).is_dir():
        return all(SHARD_FILE.fullmatch(re.sub(r"\.json(\.partial)?$", "", final_name(n) or n))
                   for n in os.listdir(out / name))
    return False


def _carried_names(out: Path) -> set[str]:
    names: set[str] = set()
    for doc, key in ((read_json(out / PLAN), "carried"), (read_json(out / MANIFEST), "carried")):
        if isinstance(doc, dict) and isinstance(doc.get(key), list):
            names.update(n for n in doc[key] if isinstance(n, str) and "/" not in n)
    return names


def remove_owned(out: Path) -> None:
    """Remove what this converter wrote (the manifest first, so no reader sees it point at missing shards)."""
    carried = _carried_names(out)
    names = sorted(os.listdir(out), key=lambda n: n != MANIFEST)
    for name in names:
        if _is_owned(out, name, carried):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def inspect_output(out: Path, plan: dict, overwrite: bool) -> str:
    """'fresh', 'overwrite', 'resume' or 'finished'; refuses (OutputError) when the directory is not ours to use."""
    if not out.exists():
        return "fresh"
    if not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    names = sorted(os.listdir(out))
    if not names:
        return "fresh"
    if overwrite:
        carried = _carried_names(out)
        foreign = [n for n in names if not _is_owned(out, n, carried)]
        if foreign:
            more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
            raise OutputError(f"{out / foreign[0]}{more}: not written by data_prep; --overwrite removes only "
                              f"converter files, so move it away or choose another output directory")
        return "overwrite"
    old_plan = read_json(out / PLAN)
    if not isinstance(old_plan, dict):
        raise OutputError(f"{out}: not empty and holds no conversion plan ({PLAN}); choose an empty or new output "
                          f"directory, or use --overwrite to replace a previous conversion")
    difference = plan_difference(old_plan, plan)
    finished = isinstance(read_json(out / MANIFEST), dict)  # one torn by a power loss is rewritten on resume
    if difference:
        what = "a finished conversion" if finished else "an unfinished conversion"
        raise OutputError(f"{out}: holds {what} with other sources or options ({difference}); rerun with the "
                          f"original sources and options to {'keep' if finished else 'resume'} it, or use "
                          f"--overwrite to start over")
    return "finished" if finished else "resume"
