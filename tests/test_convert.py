"""data_prep.rec2arrow / folder2arrow / verify on real files: round trips, orders, resume after a SIGKILL, every bad
input (with the output directory left exactly as it was), output directory rules, and verify catching damage."""
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_prep import convert, folder2arrow, rec2arrow, verify
from data_prep.plan import (
    MAX_AUTO_SHARDS, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, MIN_ROWS_PER_SHARD, TARGET_SHARD_BYTES, choose_num_shards,
    chunk_bytes_for,
)
from data_prep.source import SourceError
from data_prep.recordio import (
    MAGIC_BYTES, RecordReader, detect_layout, pack_image_record, read_idx, write_insightface_rec, write_plain_rec,
    write_recordio,
)
from ds_face.data.shards import ROWS_PER_RECORD_BATCH, SCHEMA, read_manifest, rows_per_shard, sha256_of

REPO = Path(__file__).resolve().parents[1]
MULTIPART_KEY = 6  # in `source()`: the image whose payload holds MAGIC at a 4-aligned position


def jpeg(rng: random.Random, n: int) -> bytes:
    return b"\xff\xd8\xff\xe0" + rng.randbytes(n) + b"\xff\xd9"


def images(n: int = 23, classes: int = 4, seed: int = 0, multipart_at: int | None = None) -> list[tuple[int, bytes]]:
    """(label, jpeg) pairs sorted by label (InsightFace keys follow this order); the image at position
    `multipart_at` carries MAGIC at image offset 4, which is 4-aligned in the record (the IRHeader is 24 bytes,
    an array label adds 4), so the writer splits that record into parts."""
    rng = random.Random(seed)
    out = sorted(((i % classes, jpeg(rng, rng.randrange(20, 90))) for i in range(n)), key=lambda item: item[0])
    if multipart_at is not None:
        label, image = out[multipart_at]
        out[multipart_at] = (label, image[:4] + MAGIC_BYTES + image[4:] + MAGIC_BYTES + b"tail")
    return out


def source(tmp_path, layout="insightface", label_as_array=False, n=23, classes=4, name="src") -> tuple[Path, list]:
    directory = tmp_path / name
    first_key = 1 if layout == "insightface" else 0
    imgs = images(n, classes, multipart_at=MULTIPART_KEY - first_key)
    write = write_insightface_rec if layout == "insightface" else write_plain_rec
    write(directory, imgs, label_as_array=label_as_array)
    (directory / "lfw.bin").write_bytes(b"validation pairs")
    (directory / "notes.lst").write_text("not carried")
    return directory, imgs


def rec2arrow_main(src, out, *extra, workers=2) -> int:
    return rec2arrow.main([str(src), str(out), "--workers", str(workers), *map(str, extra)])


def shard_table(path) -> pa.Table:
    with pa.ipc.open_stream(Path(path).read_bytes()) as reader:  # not mmap: tests rewrite shards they read
        assert reader.schema.equals(SCHEMA)
        return reader.read_all()


def all_rows(out) -> list[tuple[int, int, bytes]]:
    """(index, label, image) of every row, shards in manifest order."""
    rows = []
    for path in read_manifest(out).shard_paths(out):
        t = shard_table(path).to_pydict()
        rows += list(zip(t["index"], t["label"], t["image"]))
    return rows


def snapshot(path: Path) -> dict | None:
    """Every file and directory under `path` with its bytes: equal snapshots mean nothing was touched."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(path.rglob("*"))}


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


# ---- round trips ----

@pytest.mark.parametrize("label_as_array", [False, True], ids=["float-label", "array-label"])
@pytest.mark.parametrize("layout", ["insightface", "plain"])
def test_rec_round_trip(tmp_path, layout, label_as_array):
    from datasets import Dataset, load_dataset

    src, imgs = source(tmp_path, layout, label_as_array)
    assert any(MAGIC_BYTES in image for _, image in imgs)
    out = tmp_path / "out"
    assert rec2arrow_main(src, out, "--shards", 3) == 0

    first_key = 1 if layout == "insightface" else 0
    rows = sorted(all_rows(out))
    assert [r[0] for r in rows] == list(range(first_key, first_key + len(imgs)))  # every image key exactly once
    assert [(label, image) for _, label, image in rows] == imgs  # bytes and labels as in the source

    manifest = read_manifest(out)
    assert [s.rows for s in manifest.shards] == rows_per_shard(23, 3) == [8, 8, 7]
    assert (manifest.num_samples, manifest.num_classes, manifest.image_size) == (23, 4, [112, 112])
    assert manifest.converter == "data_prep.rec2arrow 0.1.0"
    assert manifest.options == {"order": "shuffled", "seed": 0}
    assert [(Path(s["file"]).name, s["bytes"]) for s in manifest.sources] == [
        (name, (src / name).stat().st_size) for name in ("train.rec", "train.idx", "property")]
    assert manifest.carried == ["lfw.bin", "property"]
    for name in manifest.carried:
        assert (out / name).read_bytes() == (src / name).read_bytes()
    for shard in manifest.shards:
        assert (shard.bytes, shard.sha256) == ((out / shard.file).stat().st_size, sha256_of(out / shard.file))
    assert sorted(os.listdir(out)) == sorted([s.file for s in manifest.shards] + manifest.carried
                                             + ["manifest.json", "plan.json"])  # no sidecars, no partials left

    paths = manifest.shard_paths(out)
    from_file = [row for p in paths for row in Dataset.from_file(p)]
    streamed = list(load_dataset("arrow", data_files=paths, split="train", streaming=True))
    for got in (from_file, streamed):
        assert sorted((r["index"], r["label"], r["image"]) for r in got) == rows


def test_orders_and_record_batches(tmp_path):
    src, _ = source(tmp_path, "insightface", n=2500, classes=5)  # keys sorted by identity, as InsightFace's are
    keys = list(range(1, 2501))

    def convert(name, *extra):
        assert rec2arrow_main(src, tmp_path / name, "--shards", 2, *extra) == 0
        return read_manifest(tmp_path / name), all_rows(tmp_path / name)

    manifest, rows = convert("source", "--order", "source")
    assert manifest.options == {"order": "source", "seed": None}
    assert [r[0] for r in rows] == keys  # contiguous, in source order
    assert {r[1] for r in rows[:1250]} == {0, 1, 2}  # ... so shard 0 holds only the first identities
    for shard in manifest.shard_paths(tmp_path / "source"):
        assert [b.num_rows for b in shard_table(shard).to_batches()] == [ROWS_PER_RECORD_BATCH, 250]

    a_manifest, a = convert("a", "--seed", 7)
    b_manifest, b = convert("b", "--seed", 7)
    _, c = convert("c", "--seed", 8)
    assert a_manifest.options == {"order": "shuffled", "seed": 7}
    assert a == b and [s.sha256 for s in a_manifest.shards] == [s.sha256 for s in b_manifest.shards]
    assert a != c
    assert sorted(r[0] for r in a) == keys and [r[0] for r in a] != keys  # a permutation of every key
    assert {r[1] for r in a[:1250]} == {r[1] for r in a[1250:]} == {0, 1, 2, 3, 4}  # every shard: all identities


def test_choose_num_shards():
    assert choose_num_shards(1, 100) == 1
    assert choose_num_shards(23, 10**6) == 1  # fewer rows than MIN_ROWS_PER_SHARD: one shard
    assert choose_num_shards(MIN_ROWS_PER_SHARD * 2, 10**9) == 2  # by bytes 4, but shards keep 64 rows
    assert choose_num_shards(10_000, 10**8) == 1
    assert choose_num_shards(10_000, TARGET_SHARD_BYTES + 1) == 2
    assert choose_num_shards(161_403, 10**9) == 4  # the 1 GB benchmark set
    ms1m = choose_num_shards(5_200_000, 38 * 10**9)  # MS1MV3-sized, at ~7 KB an image
    assert ms1m == 142 and 38 * 10**9 / ms1m <= TARGET_SHARD_BYTES
    assert choose_num_shards(42_000_000, 300 * 10**9) == MAX_AUTO_SHARDS  # WebFace42M-sized: ~590 MB shards
    assert chunk_bytes_for(1) == chunk_bytes_for(64) == MIN_CHUNK_BYTES
    assert chunk_bytes_for(142) == 142 << 20 and chunk_bytes_for(MAX_AUTO_SHARDS) == MAX_CHUNK_BYTES


def test_folder_round_trip(tmp_path):
    rng = random.Random(1)
    src = tmp_path / "faces"
    png = b"\x89PNG\r\n\x1a\n" + rng.randbytes(30)
    files = {"bob": {"2.jpg": jpeg(rng, 40), "10.JPEG": jpeg(rng, 50), "a.png": png},
             "alice": {"x.jpeg": jpeg(rng, 60)},
             "carol": {"c1.Jpg": jpeg(rng, 20), "c2.jpg": jpeg(rng, 25)}}
    for identity, content in files.items():
        for name, data in content.items():
            (src / identity).mkdir(parents=True, exist_ok=True)
            (src / identity / name).write_bytes(data)
    (src / "bob" / "notes.txt").write_text("not an image")  # ignored: not .jpg/.jpeg/.png
    (src / ".thumbnails").mkdir()  # hidden: not an identity
    (src / "README").write_text("top-level files are ignored")
    out = tmp_path / "out"
    assert folder2arrow.main([str(src), str(out), "--workers", "2", "--shards", "2"]) == 0

    expected = [(label, files[identity][name]) for label, identity in enumerate(["alice", "bob", "carol"])
                for name in sorted(files[identity])]
    assert [(label, image) for _, label, image in sorted(all_rows(out))] == expected
    assert sorted(r[0] for r in all_rows(out)) == list(range(6))  # index: position in the sorted listing
    manifest = read_manifest(out)
    assert (manifest.num_classes, manifest.converter, manifest.carried) == (3, "data_prep.folder2arrow 0.1.0",
                                                                         ["classes.json"])
    assert json.loads((out / "classes.json").read_text()) == ["alice", "bob", "carol"]
    assert verify.main([str(out), "--workers", "2", "--source", str(src)]) == 0


def test_folder_bad_inputs(tmp_path, capsys):
    src, out = tmp_path / "faces", tmp_path / "out"
    (src / "a").mkdir(parents=True)
    (src / "a" / "1.jpg").write_bytes(jpeg(random.Random(0), 30))
    (src / "b").mkdir()
    (src / "b" / "nope.txt").write_text("x")
    assert folder2arrow.main([str(src), str(out), "--workers", "2"]) == 2
    assert re.fullmatch(rf"error: {re.escape(str(src / 'b'))}: no \.jpg/\.jpeg/\.png images.*", one_error_line(capsys))
    (src / "b" / "2.jpg").write_bytes(b"GIF89a, not a jpeg")  # found by the worker that copies it
    assert folder2arrow.main([str(src), str(out), "--workers", "2"]) == 2
    assert one_error_line(capsys) == (f"error: {src / 'b' / '2.jpg'}, key 1, byte offset 0: payload is not a JPEG "
                                      f"or PNG image (first bytes: 47 49 46 38 39 61 2c 20)")
    assert not out.exists()


# ---- resume ----

KILL_AFTER_3_SHARDS = """
import os, signal, sys
from data_prep import rec2arrow
kill = lambda done: done >= 3 and os.killpg(0, signal.SIGKILL)  # the whole group: main, workers, forkserver
rec2arrow.main(sys.argv[1:], on_shard_done=kill)
"""


def test_resume_after_sigkill(tmp_path):
    src, _ = source(tmp_path, "plain", n=600, classes=7)
    out, reference = tmp_path / "out", tmp_path / "reference"
    argv = [str(src), str(out), "--workers", "1", "--shards", "12"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_3_SHARDS, *argv], cwd=REPO, env=env,
                            start_new_session=True, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert (out / "plan.json").exists() and not (out / "manifest.json").exists()
    finished = sorted(p.name[:-5] for p in (out / ".done").glob("*.json"))
    assert len(finished) >= 3
    kept, redo = finished[:-1], finished[-1]
    (out / ".done" / f"{redo}.json").unlink()  # as if killed between the shard's rename and its sidecar
    stale = out / "data-00011-of-00012.arrow.partial"
    stale.write_bytes(b"half a shard")
    before = {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in finished}

    assert rec2arrow.main(argv) == 0
    after = {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in finished}
    assert all(after[name] == before[name] for name in kept)  # verified against their sidecars, not rewritten
    assert after[redo] != before[redo]  # no sidecar: rewritten
    assert not stale.exists() and not list(out.glob("*.partial"))
    assert all(not s.file.endswith(".partial") for s in read_manifest(out).shards)

    assert rec2arrow.main([str(src), str(reference), "--workers", "2", "--shards", "12"]) == 0
    assert read_manifest(out) == read_manifest(reference)  # same shards, byte for byte (sha256), as uninterrupted
    assert verify.main([str(out), "--workers", "2", "--source", str(src)]) == 0


def test_partial_files_are_removed_on_resume_and_never_listed(tmp_path):
    src, _ = source(tmp_path)
    out = tmp_path / "out"
    assert rec2arrow_main(src, out, "--shards", 3) == 0
    (out / "manifest.json").unlink()  # an unfinished conversion: plan, shards, no manifest
    (out / "data-00001-of-00003.arrow.partial").write_bytes(b"junk")
    (out / "manifest.json.partial").write_bytes(b"{")
    assert rec2arrow_main(src, out, "--shards", 3) == 0
    assert not list(out.glob("*.partial"))
    assert [s.file for s in read_manifest(out).shards] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]


# ---- bad inputs: a clear error, and the output directory exactly as it was ----

def record_offset(src: Path, key: int) -> int:
    return dict(read_idx(src / "train.idx"))[key]


def patch(path: Path, offset: int, data: bytes) -> None:
    content = bytearray(path.read_bytes())
    content[offset:offset + len(data)] = data
    path.write_bytes(bytes(content))


def set_idx_offset(src: Path, key: int, offset: int) -> None:
    pairs = [(k, offset if k == key else o) for k, o in read_idx(src / "train.idx")]
    (src / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in pairs))


def set_label(src: Path, key: int, value: float) -> None:  # the IRHeader float of a flag-0 record
    patch(src / "train.rec", record_offset(src, key) + 8 + 4, struct.pack("<f", value))


def cut(src: Path, key: int, keep: int) -> None:  # keep `keep` bytes of the record at `key`
    rec = src / "train.rec"
    rec.write_bytes(rec.read_bytes()[:record_offset(src, key) + keep])


def empty_rec(src: Path) -> None:
    write_recordio(src / "train.rec", src / "train.idx", [])
    (src / "property").write_text("4,112,112\n")


BAD_INPUTS = {
    "missing-rec": (lambda s: (s / "train.rec").unlink(), r"{src}/train\.rec: record file not found"),
    "missing-idx": (lambda s: (s / "train.idx").unlink(), r"{src}/train\.idx: index file not found"),
    "missing-property": (lambda s: (s / "property").unlink(), r"{src}/property: property file not found"),
    "truncated-rec": (lambda s: cut(s, 27, 12),  # in the last record: an identity record, never converted
                      r"{rec}, key 27, byte offset {off27}: part length \d+ runs past the end of the file"),
    "truncated-rec-in-images": (lambda s: cut(s, 12, 20),
                                r"{rec}, key 27, byte offset {off27}: offset is past the end of the file"),
    "wrong-magic": (lambda s: patch(s / "train.rec", record_offset(s, 5), b"\0\0\0\0"),
                    r"{rec}, key 5, byte offset {off5}: bad magic 0x00000000"),
    "idx-past-end": (lambda s: set_idx_offset(s, 5, 10**6),
                     r"{rec}, key 5, byte offset 1000000: offset is past the end of the file"),
    "idx-into-record": (lambda s: set_idx_offset(s, 5, record_offset(s, MULTIPART_KEY) + 8 + 28),  # its 2nd part
                        r"{rec}, key 5, byte offset {off6_part2}: cflag [23] \((middle|end)\) without a start part"),
    "idx-same-record": (lambda s: set_idx_offset(s, 5, record_offset(s, 4)),
                        r"{rec}, key 5, byte offset {off4}: keys 4 and 5 point to the same record"),
    "absurd-length": (lambda s: patch(s / "train.rec", record_offset(s, 5) + 4, struct.pack("<I", 0x1FFFFFFF)),
                      r"{rec}, key 5, byte offset {off5}: part length 536870911 runs past the end of the file"),
    "label-too-large": (lambda s: set_label(s, 5, 4.0),
                        r"{rec}, key 5, byte offset {off5}: label 4 is outside \[0, 4\) \(num_classes from property\)"),
    "property-too-few-classes": (lambda s: (s / "property").write_text("3,112,112\n"),
                                 r"{rec}, key 23, byte offset {off23}: label 3 is outside \[0, 3\)"),
    "label-negative": (lambda s: set_label(s, 5, -1.0), r"{rec}, key 5, byte offset {off5}: label -1 is outside"),
    "label-not-integral": (lambda s: set_label(s, 5, 2.5),
                           r"{rec}, key 5, byte offset {off5}: label 2\.5 is not an integer"),
    "not-a-jpeg": (lambda s: patch(s / "train.rec", record_offset(s, 5) + 8 + 24, b"GIF8"),
                   r"{rec}, key 5, byte offset {off5}: payload is not a JPEG or PNG image \(first bytes: 47 49 46 38"),
    "empty-dataset": (empty_rec, r"{src}/train\.idx: no image records \(0 keys in the \.idx, plain layout\)"),
    # where the bulk parser hands a record to the one-by-one reader: the same errors, the same names
    "bad-magic-in-second-part": (lambda s: patch(s / "train.rec", record_offset(s, MULTIPART_KEY) + 8 + 28, b"\0" * 4),
                                 r"{rec}, key 6, byte offset {off6_part2}: bad magic 0x00000000 .*\(in the record "
                                 r"starting at byte offset {off6}\)"),
    "invalid-cflag": (lambda s: set_cflag(s, 5, 5), r"{rec}, key 5, byte offset {off5}: invalid cflag 5"),
    "irheader-flag-too-large": (lambda s: patch(s / "train.rec", record_offset(s, 5) + 8, struct.pack("<I", 2**31 - 1)),
                                r"{rec}, key 5, byte offset {off5}: IRHeader flag 2147483647 announces 8589934588 "
                                r"bytes of float32 labels, but only \d+ bytes follow the header"),
    "label-nan": (lambda s: set_label(s, 5, float("nan")), r"{rec}, key 5, byte offset {off5}: label nan is not an "
                                                           r"integer"),
}


def set_cflag(src: Path, key: int, cflag: int) -> None:
    at = record_offset(src, key) + 4
    (lrecord,) = struct.unpack_from("<I", (src / "train.rec").read_bytes(), at)
    patch(src / "train.rec", at, struct.pack("<I", cflag << 29 | lrecord & ((1 << 29) - 1)))


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_named_and_output_untouched(tmp_path, capsys, case):
    src, _ = source(tmp_path, "insightface")
    offsets = {f"off{k}": record_offset(src, k) for k in (4, 5, 6, 23, 27)}
    offsets["off6_part2"] = record_offset(src, MULTIPART_KEY) + 8 + 28
    mutate, pattern = BAD_INPUTS[case]
    mutate(src)
    expected = "error: " + pattern.format(src=re.escape(str(src)), rec=re.escape(str(src / "train.rec")), **offsets)
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new", empty):  # a directory to create, and an existing empty one
        before = snapshot(out)
        assert rec2arrow_main(src, out, "--shards", 3) == 2
        assert re.match(expected, one_error_line(capsys)), expected
        assert snapshot(out) == before


# ---- the output directory ----

def test_output_directory_rules(tmp_path, capsys):
    src, _ = source(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert rec2arrow_main(src, out) == 2
    assert "not empty and holds no conversion plan" in one_error_line(capsys)
    assert rec2arrow_main(src, out, "--overwrite") == 2  # --overwrite removes converter files only
    assert re.match(rf"error: {re.escape(str(out / 'notes.txt'))}: not written by data_prep", one_error_line(capsys))
    assert snapshot(out) == {"notes.txt": b"mine"}

    (out / "notes.txt").unlink()
    assert rec2arrow_main(src, out) == 0
    finished = snapshot(out)
    assert rec2arrow_main(src, out) == 0  # already finished: nothing to do
    assert "already converted" in capsys.readouterr().out and snapshot(out) == finished
    assert rec2arrow_main(src, out, "--seed", 1) == 2
    assert 'other sources or options (options: {"order": "shuffled", "seed": 0' in one_error_line(capsys)

    (out / "manifest.json").unlink()  # unfinished now
    os.utime(src / "train.rec")
    unfinished = snapshot(out)
    assert rec2arrow_main(src, out) == 2
    error = one_error_line(capsys)
    assert f"source {src.resolve() / 'train.rec'} changed since (mtime_ns)" in error and "--overwrite" in error
    assert snapshot(out) == unfinished

    assert rec2arrow_main(src, out, "--overwrite", "--order", "source") == 0
    assert read_manifest(out).options == {"order": "source", "seed": None}
    (out / "lfw.bin").write_bytes(b"carried files listed in the manifest are the converter's")
    assert rec2arrow_main(src, out, "--overwrite") == 0
    assert (out / "lfw.bin").read_bytes() == (src / "lfw.bin").read_bytes()

    (tmp_path / "file").write_text("x")
    assert rec2arrow_main(src, tmp_path / "file") == 2
    assert "exists and is not a directory" in one_error_line(capsys)


# ---- verify ----

def rewrite_shard(out: Path, index: int, table: pa.Table) -> None:
    """Replace a shard and fix its manifest size and checksum, so that only the content is wrong."""
    manifest = read_manifest(out)
    shard = manifest.shards[index]
    with pa.OSFile(str(out / shard.file), "wb") as f, pa.ipc.new_stream(f, SCHEMA) as writer:
        writer.write_table(table)
    shard.bytes, shard.sha256 = (out / shard.file).stat().st_size, sha256_of(out / shard.file)
    manifest.write(out)


def test_verify_detects_damage(tmp_path, capsys):
    src, _ = source(tmp_path)
    out = tmp_path / "out"
    assert rec2arrow_main(src, out, "--shards", 3) == 0
    assert verify.main([str(out), "--workers", "2", "--source", str(src)]) == 0
    summary = capsys.readouterr().out
    assert "samples 23 in 3 shards" in summary and "images per class: min 5, median 6, max 6" in summary
    manifest = read_manifest(out)
    names = [s.file for s in manifest.shards]
    pristine = {name: (out / name).read_bytes() for name in names + ["manifest.json"]}

    def restore():
        for name, data in pristine.items():
            (out / name).write_bytes(data)

    damaged = bytearray(pristine[names[1]])
    damaged[len(damaged) // 2] ^= 0xFF
    (out / names[1]).write_bytes(bytes(damaged))
    assert verify.main([str(out), "--workers", "2"]) == 1
    assert re.match(rf"error: {names[1]}: sha256 [0-9a-f]{{64}}, the manifest says", one_error_line(capsys))
    restore()

    rewrite_shard(out, 0, shard_table(out / names[0]).slice(0, 7))  # one row short
    assert verify.main([str(out), "--workers", "2"]) == 1
    assert one_error_line(capsys) == f"error: {names[0]}: holds 7 rows, the manifest says 8"
    restore()

    rewrite_shard(out, 1, shard_table(out / names[0]))  # shard 0's rows twice
    assert verify.main([str(out), "--workers", "2"]) == 1
    assert re.match(rf"error: {names[1]}, row (\d+): index \d+ also in {names[0]}, row \1$", one_error_line(capsys))
    restore()

    table = shard_table(out / names[2])
    labels = table.column("label").to_pylist()
    rewrite_shard(out, 2, table.set_column(1, "label", pa.array([(labels[0] + 1) % 4] + labels[1:], pa.int64())))
    assert verify.main([str(out), "--workers", "2"]) == 0  # still a valid dataset on its own ...
    assert verify.main([str(out), "--workers", "2", "--source", str(src)]) == 1  # ... but not the source's
    assert re.match(rf"error: {names[2]}, row 0 \(index \d+\): label \d, the source says {labels[0]}",
                    one_error_line(capsys))


def test_rec_file_path_and_prefix(tmp_path):
    src, imgs = source(tmp_path)
    for name in ("rec", "idx"):
        (src / f"train.{name}").rename(src / f"val.{name}")
    assert rec2arrow_main(src, tmp_path / "by-prefix", "--prefix", "val") == 0
    assert rec2arrow_main(src / "val.rec", tmp_path / "by-path") == 0
    assert read_manifest(tmp_path / "by-prefix") == read_manifest(tmp_path / "by-path")
    assert sorted((label, image) for _, label, image in all_rows(tmp_path / "by-path")) == sorted(imgs)


# ---- record by record: the shards against the pure-Python RecordReader reading the same .rec ----

def reference_rows(src: Path) -> tuple[list[int], dict[int, tuple[int, bytes]], dict[int, int]]:
    """What every row must hold, read one record at a time by RecordReader (the reader the old converter used
    for every record): the image keys in .idx order, key -> (label, image bytes), key -> .rec offset."""
    idx = read_idx(src / "train.idx")
    with RecordReader(src / "train.rec") as reader:
        layout = detect_layout(reader, *zip(*idx))
        offsets = dict(idx)
        rows = {}
        for key in layout.image_keys.tolist():
            _, labels, _, _, image = reader.read_image_record(offsets[key], key)
            rows[key] = (int(labels[0]), image)
    return layout.image_keys.tolist(), rows, offsets


def planned_shards(keys: list[int], num_shards: int, order: str, seed: int) -> list[set[int]]:
    """The shard assignment of the converter before the single-pass rewrite, written out independently: shard i
    holds the keys at permutation[bounds[i]:bounds[i+1]] (a seeded permutation, or source order)."""
    n = len(keys)
    perm = np.random.default_rng(seed).permutation(n) if order == "shuffled" else np.arange(n)
    bounds = np.concatenate([[0], np.cumsum(rows_per_shard(n, num_shards))])
    return [{keys[p] for p in perm[bounds[i]:bounds[i + 1]]} for i in range(num_shards)]


def check_against_reference(src: Path, out: Path, num_shards: int, order: str = "shuffled", seed: int = 0):
    keys, expected, offsets = reference_rows(src)
    manifest = read_manifest(out)
    assert manifest.num_samples == len(keys) and len(manifest.shards) == num_shards
    seen = []
    for path, plan in zip(manifest.shard_paths(out), planned_shards(keys, num_shards, order, seed)):
        table = shard_table(path)
        assert all(b.num_rows <= ROWS_PER_RECORD_BATCH for b in table.to_batches())
        rows = table.to_pydict()
        assert set(rows["index"]) == plan  # the same shard assignment as before
        assert [offsets[k] for k in rows["index"]] == sorted(offsets[k] for k in rows["index"])  # in file order
        for key, label, image in zip(rows["index"], rows["label"], rows["image"]):
            assert (label, image) == expected[key], f"key {key}"
        seen += rows["index"]
    assert sorted(seen) == sorted(keys)  # every image record exactly once


def tiny_and_tricky_images(rng: random.Random) -> list[bytes]:
    """Images around the 12-byte inline limit of Arrow binary views, a PNG, MAGIC right where the image starts
    and twice more inside it (a record of several parts), and ordinary ones."""
    return [b"\xff\xd8\xff", b"\xff\xd8\xff" + rng.randbytes(9), b"\xff\xd8\xff" + rng.randbytes(10),
            b"\x89PNG\r\n\x1a\n" + rng.randbytes(40),
            MAGIC_BYTES + b"\xff\xd8\xff\xe0" + rng.randbytes(30),  # not a JPEG: kept out of the good sets
            b"\xff\xd8\xff\xe0" + MAGIC_BYTES + rng.randbytes(8) + MAGIC_BYTES + MAGIC_BYTES + b"end.",
            ] + [jpeg(rng, rng.randrange(20, 3000)) for _ in range(40)]


def write_custom_rec(directory: Path, layout: str, labels_per_record: int, shuffle_file_order: bool,
                     n: int = 300, classes: int = 7, seed: int = 3) -> None:
    """A .rec of `n` images: InsightFace layout (header, images, identity records) or plain im2rec layout; a
    float label (labels_per_record 0) or an array of that many floats (the class first, then others, as in
    multi-label im2rec files); written in key order or in a shuffled file order (and a shuffled .idx)."""
    rng = random.Random(seed)
    pool = [image for image in tiny_and_tricky_images(rng) if image[:3] in (b"\xff\xd8\xff", b"\x89PN")]
    images = sorted((i % classes, pool[i % len(pool)]) for i in range(n))
    directory.mkdir(parents=True)

    def pack(label, image):
        if labels_per_record == 0:
            return pack_image_record(label, image)
        return pack_image_record([label] + [rng.uniform(-2, 2) for _ in range(labels_per_record - 1)], image)

    first = 1 if layout == "insightface" else 0
    records = [(first + i, pack(label, image)) for i, (label, image) in enumerate(images)]
    if layout == "insightface":
        id_start = n + 1
        records.insert(0, (0, pack_image_record([id_start, id_start + classes], b"", id2=1)))
        counts = np.bincount([label for label, _ in images], minlength=classes)
        begins = np.concatenate([[1], 1 + np.cumsum(counts)])
        records += [(id_start + c, pack_image_record([begins[c], begins[c + 1]], b"")) for c in range(classes)]
    if shuffle_file_order:
        rng.shuffle(records)
    idx = write_recordio(directory / "train.rec", directory / "train.idx", records)
    if shuffle_file_order:
        rng.shuffle(idx)
        (directory / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in idx))
    (directory / "property").write_text(f"{classes},112,112\n")


EQUALITY_CASES = {
    "insightface-float-label": ("insightface", 0, False),
    "insightface-array-label": ("insightface", 1, False),
    "headerless-float-label": ("plain", 0, False),
    "headerless-multi-label": ("plain", 3, False),
    "headerless-multi-label-shuffled-file": ("plain", 5, True),
    "insightface-shuffled-file": ("insightface", 2, True),
}


@pytest.mark.parametrize("case", EQUALITY_CASES)
def test_shards_equal_record_reader_record_by_record(tmp_path, case):
    src = tmp_path / "src"
    write_custom_rec(src, *EQUALITY_CASES[case])
    data = (src / "train.rec").read_bytes()
    cflags = [struct.unpack_from("<I", data, o + 4)[0] >> 29 for _, o in read_idx(src / "train.idx")]
    assert 1 in cflags  # multi-part records: the fast path hands them to the slow one
    manifests = []
    for name, chunk_bytes, workers, order in (("tiny-chunks", 4096, 1, "shuffled"), ("one-chunk", 64 << 20, 3,
                                              "shuffled"), ("same-one-chunk", 64 << 20, 1, "shuffled"),
                                              ("source-order", 20000, 2, "source")):
        out = tmp_path / name
        convert.convert(rec2arrow.open_rec_source(src), out, num_shards=3, order=order, workers=workers,
                        chunk_bytes=chunk_bytes)
        check_against_reference(src, out, 3, order)
        manifests.append(read_manifest(out))
        assert verify.main([str(out), "--workers", "2", "--source", str(src)]) == 0
    assert manifests[1] == manifests[2]  # byte for byte (sha256) whatever the number of threads
    assert [s.rows for s in manifests[0].shards] == [s.rows for s in manifests[1].shards]


def test_insightface_source_with_multipart_matches_reference(tmp_path):
    """The layout of the round-trip tests (InsightFace, a multi-part record at key 6), default options."""
    src, _ = source(tmp_path, "insightface", n=700, classes=9)
    out = tmp_path / "out"
    assert rec2arrow_main(src, out) == 0
    check_against_reference(src, out, read_manifest(out).shards.__len__())


def test_rec_changed_during_conversion_is_named(tmp_path, capsys):
    """The .rec cut short after the checks at open time: the pass names the file and the offset, and a fresh
    output directory is left as it was (absent)."""
    src, _ = source(tmp_path, "plain", n=400, classes=5)
    opened = rec2arrow.open_rec_source(src)
    rec = src / "train.rec"
    cut_at = record_offset(src, 200) + 10
    rec.write_bytes(rec.read_bytes()[:cut_at])
    out = tmp_path / "out"
    with pytest.raises(SourceError) as error:
        convert.convert(opened, out, num_shards=2, workers=2)
    assert re.match(rf"{re.escape(str(rec))}, (key \d+, )?byte offset \d+: ", str(error.value)), str(error.value)
    assert not out.exists()
