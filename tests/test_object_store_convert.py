"""Conversion into object storage (`rec2arrow SRC s3://...`, `folder2arrow`) and `verify` from it, against a real
S3 server on loopback (moto's, tests/object_store.py) through the real client (s3fs): the store ends up holding
exactly the files of a local conversion of the same input, byte for byte; a conversion killed (SIGKILL) after
some shards were uploaded is resumed by the same command, which uploads only what is missing (the requests the
server answered are counted); a prefix that holds a dataset or foreign objects is refused and left untouched;
verify passes from the URL and names a shard replaced in the store. Nothing mocked."""
import contextlib
import logging
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import folder2arrow, rec2arrow, verify
from data_prep.plan import SHARD_FILE
from ds_face.data.shards import read_manifest
from tests.test_convert import jpeg, one_error_line, source

REPO = Path(__file__).resolve().parents[1]
SHARDS = 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A RecordIO source (with a carried lfw.bin) and its local conversion: what the store must end up holding."""
    tmp = tmp_path_factory.mktemp("reference")
    src, _ = source(tmp, "plain", n=240, classes=7)
    local = tmp / "local"
    assert rec2arrow.main([str(src), str(local), "--workers", "2", "--shards", str(SHARDS)]) == 0
    return src, local


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def objects(s3, prefix: str) -> dict[str, bytes]:
    """Every object under the prefix (sub-prefixes included) by its name below it, with its bytes."""
    fs = s3.filesystem()
    root = f"{s3.bucket}/{prefix}/"
    return {path[len(root):]: fs.cat_file(path) for path in sorted(fs.find(root))}


@contextlib.contextmanager
def requests_answered():
    """The server's own access log (werkzeug's, in this process) as (method, path) pairs, as it answers them."""
    seen: list[tuple[str, str]] = []

    class Collect(logging.Handler):
        def emit(self, record):
            if found := re.search(r'"([A-Z]+) (\S+) HTTP/', record.getMessage()):
                seen.append((found[1], found[2].split("?")[0]))

    logger, handler = logging.getLogger("werkzeug"), Collect(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def written(seen, s3, prefix: str) -> list[str]:
    """The names put under the prefix, in order (a shard this small is one PUT)."""
    root = f"/{s3.bucket}/{prefix}/"
    return [path[len(root):] for method, path in seen if method == "PUT" and path.startswith(root)]


def changes(seen) -> list[tuple[str, str]]:
    return [(method, path) for method, path in seen if method not in ("GET", "HEAD")]


def test_object_store_conversion_equals_a_local_one_and_verifies_from_the_url(s3, reference, tmp_path, capsys):
    src, local = reference
    url, staging = s3.url("rec"), tmp_path / "staging"
    with requests_answered() as seen:
        assert rec2arrow.main([str(src), url, "--workers", "2", "--shards", str(SHARDS), "--staging",
                               str(staging)]) == 0
    # plan, shards, property, lfw.bin, manifest: the local conversion's files byte for byte, no sidecar left
    assert objects(s3, "rec") == files(local)
    assert read_manifest(url) == read_manifest(local)
    put = written(seen, s3, "rec")
    assert put[0] == "plan.json" and put.index("manifest.json") == len(put) - 1, put  # the plan first, manifest last
    for shard in (s.file for s in read_manifest(local).shards):  # each shard whole before its sidecar
        assert put.count(shard) == 1 and put.index(shard) < put.index(f"{shard}.done.json")
    assert list(staging.iterdir()) == [], "the staging directory goes when the command ends"

    assert verify.main([url, "--workers", "2", "--source", str(src)]) == 0
    summary = capsys.readouterr().out
    assert f"{url}: OK" in summary and f"samples 240 in {SHARDS} shards" in summary

    rng = random.Random(1)  # an image folder too: folder2arrow shares the engine
    folder = tmp_path / "faces"
    for identity, count in (("alice", 3), ("bob", 5), ("carol", 2)):
        (folder / identity).mkdir(parents=True)
        for k in range(count):
            (folder / identity / f"{k}.jpg").write_bytes(jpeg(rng, 40 + k))
    assert folder2arrow.main([str(folder), str(tmp_path / "folder-local"), "--workers", "2", "--shards", "3"]) == 0
    assert folder2arrow.main([str(folder), s3.url("folder"), "--workers", "2", "--shards", "3"]) == 0
    assert objects(s3, "folder") == files(tmp_path / "folder-local")
    assert verify.main([s3.url("folder"), "--workers", "1", "--source", str(folder)]) == 0


KILL_AFTER_3_SHARDS = """
import os, signal, sys
from data_prep import rec2arrow
kill = lambda done: done >= 3 and os.killpg(0, signal.SIGKILL)  # called once a shard and its sidecar are uploaded
rec2arrow.main(sys.argv[1:], on_shard_done=kill)
"""


def test_object_store_killed_conversion_resumes_uploading_only_what_is_missing(s3, reference, tmp_path):
    src, local = reference
    url = s3.url("killed")
    argv = [str(src), url, "--workers", "1", "--shards", str(SHARDS), "--staging", str(tmp_path / "staging")]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_3_SHARDS, *argv], cwd=REPO, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    there = objects(s3, "killed")
    assert "plan.json" in there and "manifest.json" not in there  # no reader takes it for a dataset
    shards = sorted(name for name in there if SHARD_FILE.fullmatch(name))
    assert all(there[name] == (local / name).read_bytes() for name in shards), "only whole shards at final names"
    vouched = [name for name in shards if f"{name}.done.json" in there]
    assert len(vouched) >= 3
    kept, redo = vouched[:-1], vouched[-1]
    s3.filesystem().rm_file(f"{s3.bucket}/killed/{redo}.done.json")  # as if killed between a shard and its sidecar

    with requests_answered() as seen:
        assert rec2arrow.main(argv) == 0
    put = written(seen, s3, "killed")
    missing = sorted(set(s.file for s in read_manifest(local).shards) - set(kept))
    assert sorted(name for name in put if SHARD_FILE.fullmatch(name)) == missing  # each once, the kept ones never
    assert redo in missing and "plan.json" not in put and put[-1] == "manifest.json"
    assert objects(s3, "killed") == files(local), "the same dataset as an uninterrupted conversion"
    assert verify.main([url, "--workers", "2"]) == 0


def test_object_store_prefix_holding_a_dataset_or_foreign_objects_is_refused_untouched(s3, reference, capsys):
    src, local = reference
    url = s3.upload(local, "finished")  # a finished conversion, plan.json included
    before = objects(s3, "finished")
    argv = [str(src), url, "--workers", "1", "--shards", str(SHARDS)]
    with requests_answered() as seen:
        assert rec2arrow.main(argv) == 0  # the same conversion, finished: nothing to do
        assert "already converted" in capsys.readouterr().out
        assert rec2arrow.main([*argv, "--seed", "1"]) == 2
        assert one_error_line(capsys).startswith(f"error: {url}/manifest.json: the prefix already holds a finished "
                                                 f'dataset (options: {{"order": "shuffled", "seed": 0')
        assert rec2arrow.main([*argv, "--overwrite"]) == 2
        assert one_error_line(capsys) == (f"error: {url}: --overwrite is for local directories; a dataset in a "
                                          f"store is never overwritten in place: choose a new prefix")
    assert changes(seen) == [] and objects(s3, "finished") == before

    fs = s3.filesystem()
    fs.rm_file(f"{s3.bucket}/finished/plan.json")  # a dataset copied there by other tools
    assert rec2arrow.main(argv) == 2
    assert one_error_line(capsys) == (f"error: {url}/manifest.json: the prefix already holds a finished dataset (no "
                                      f"plan.json beside it); a dataset in a store is never overwritten: choose a "
                                      f"new prefix")
    fs.pipe_file(f"{s3.bucket}/foreign/notes.txt", b"mine")
    assert rec2arrow.main([str(src), s3.url("foreign"), "--workers", "1"]) == 2
    assert one_error_line(capsys) == (f"error: {s3.url('foreign')}/notes.txt: the prefix is not empty and holds no "
                                      f"conversion plan (plan.json); choose an empty or new prefix")
    assert objects(s3, "foreign") == {"notes.txt": b"mine"}
    assert rec2arrow.main([str(src), "s3://no-such-bucket/faces", "--workers", "1"]) == 2
    assert re.fullmatch(r"error: s3://no-such-bucket/faces/plan.json: cannot be written \(.+\); does the bucket "
                        r"exist\?", one_error_line(capsys))


def test_object_store_verify_names_a_shard_replaced_in_the_store(s3, reference, capsys):
    _, local = reference
    url = s3.upload(local, "replaced")
    shard = read_manifest(local).shards[5]
    original = (local / shard.file).read_bytes()
    forged = bytearray(original)
    forged[-20:] = b"x" * 20  # same size, other bytes: only the sha256 tells
    fs = s3.filesystem()
    fs.pipe_file(f"{s3.bucket}/replaced/{shard.file}", bytes(forged))
    assert verify.main([url, "--workers", "2"]) == 1
    assert re.fullmatch(rf"error: {url}/{shard.file}: sha256 [0-9a-f]{{64}}, the manifest says {shard.sha256}: the "
                        rf"shard changed in the store since the dataset was written", one_error_line(capsys))
    fs.pipe_file(f"{s3.bucket}/replaced/{shard.file}", original[:-1])
    assert verify.main([url, "--workers", "2"]) == 1
    assert one_error_line(capsys).startswith(f"error: {url}/{shard.file}: {len(original) - 1} bytes in the store, "
                                             f"the manifest says {len(original)}")
    fs.rm_file(f"{s3.bucket}/replaced/{shard.file}")
    assert verify.main([url, "--workers", "2"]) == 1
    assert one_error_line(capsys) == f"error: {url}/{shard.file}: listed in the manifest, not in the store"
