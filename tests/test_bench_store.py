"""data_prep.bench_store on a tiny dataset against moto's S3 server on loopback (started by the benchmark): the
table's variants and columns are there and their store figures are the loader's own, consistent with the bytes
that exist. No timing assertions: only that each rate is a positive number."""
import importlib.util
import re
import sys

import pytest

from data_prep import bench_store
from ds_face.data.shards import read_manifest

needs_moto = pytest.mark.skipif(importlib.util.find_spec("moto") is None, reason="moto[server] is not installed")
COLUMNS = ["variant", "samples", "seconds", "samples/s", "samples/s per core", "samples per CPU-s", "vs local",
           "cache hit ratio (of gets)", "bytes fetched / sample", "retries", "store server CPU-s"]


def _rows(text: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == COLUMNS
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


@needs_moto
def test_object_store_benchmark_reports_local_cold_warm_and_small_cache(tmp_path, capsys):
    # 8 shards of ~60 rows; 2 streams: a step reads 2-4 shards, so half the dataset's bytes hold two steps'
    args = ["--dir", str(tmp_path), "--size-gb", "0.003", "--shards", "8", "--batch", "16", "--workers", "1",
            "--streams", "2", "--small-cache", "0.5"]
    assert bench_store.main(args) == 0
    text = capsys.readouterr().out
    rows = _rows(text)
    names = list(rows)
    assert names[0] == "local shards" and names[1].startswith("store, cold cache (") \
        and names[2] == "store, warm cache (the cold run's)" and names[3].startswith("store, cold cache of 0.5 x")
    manifest = read_manifest(next(tmp_path.glob("arrow-*")))
    epoch = manifest.num_samples // 16 * 16
    per_sample = sum(s.bytes for s in manifest.shards) / epoch  # every shard is read once in an epoch
    for name, row in rows.items():
        assert _number(row["samples"]) == epoch, name
        for column in ("seconds", "samples/s", "samples/s per core", "samples per CPU-s", "vs local"):
            assert _number(row[column]) > 0, (name, column)
        assert row["retries"] == ("-" if name == "local shards" else "0")
    assert rows["local shards"]["vs local"] == "1.00"
    assert rows["local shards"]["cache hit ratio (of gets)"] == "-"
    hit = re.compile(r"([\d.]+) of (\d+)$")
    cold, warm, small = (rows[n] for n in names[1:])
    # cold: every shard fetched once, whole: the dataset's bytes over the epoch's samples (no evictions)
    assert _number(cold["bytes fetched / sample"]) == pytest.approx(per_sample, rel=0.002)
    assert 0.0 <= float(hit.match(cold["cache hit ratio (of gets)"])[1]) <= 1.0
    # warm: every get served by the cache, nothing fetched
    assert float(hit.match(warm["cache hit ratio (of gets)"])[1]) == 1.0 and int(hit.match(
        warm["cache hit ratio (of gets)"])[2]) >= len(manifest.shards)
    assert warm["bytes fetched / sample"] == "0"
    # half the dataset: at least the dataset once is fetched (evicted shards may be fetched again)
    assert _number(small["bytes fetched / sample"]) >= per_sample * 0.998
    # the loader's own log lines are printed under the table
    assert text.count("from the node's cache;") == 3
    assert not list(tmp_path.glob("caches-*"))  # the caches are removed; the generated dataset is kept


def test_object_store_benchmark_without_moto_or_url_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "moto", None)  # as if not installed: `import moto` fails, find_spec says None
    assert bench_store.main(["--dir", "/nonexistent"]) == 2
    assert "moto" in capsys.readouterr().err
