"""Pure-Python MXNet RecordIO: round trips on generated files, multi-part records, and every malformed input."""
import os
import pickle
import random
import re
import struct

import numpy as np
import pytest

from data_prep.recordio import (
    FLOAT32_EXACT, MAGIC, MAGIC_BYTES, RecordIOError, RecordReader, _first_identity_key, detect_layout,
    pack_image_record, read_idx, read_idx_arrays, read_property, unpack_image_record, write_insightface_rec,
    write_plain_rec, write_recordio,
)

BOTH_BACKENDS = pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "buffered"])


def fake_jpeg(rng: random.Random, n: int = 37) -> bytes:
    return b"\xff\xd8" + rng.randbytes(n) + b"\xff\xd9"


def raw_part(cflag: int, data: bytes, length: int | None = None) -> bytes:
    """One part exactly as dmlc writes it; `length` overrides the length field to forge corrupt files."""
    lrecord = cflag << 29 | (len(data) if length is None else length)
    return struct.pack("<II", MAGIC, lrecord) + data + b"\0" * (-len(data) % 4)


def part_flags(rec_path) -> list[int]:
    """cflags of the physical parts of a .rec, walking the raw bytes."""
    data, pos, flags = rec_path.read_bytes(), 0, []
    while pos < len(data):
        magic, lrecord = struct.unpack_from("<II", data, pos)
        assert magic == MAGIC
        flags.append(lrecord >> 29)
        pos += 8 + ((lrecord & (1 << 29) - 1) + 3) // 4 * 4
    return flags


def make_images(n: int = 9, classes: int = 3, seed: int = 0) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    return [(rng.randrange(classes), fake_jpeg(rng, rng.randrange(5, 60))) for _ in range(n)]


def write_raw(tmp_path, *parts: bytes):
    path = tmp_path / "forged.rec"
    path.write_bytes(b"".join(parts))
    return path


def raises(pattern: str):
    return pytest.raises(RecordIOError, match=pattern)


# ---- round trips ----

@BOTH_BACKENDS
@pytest.mark.parametrize("label_as_array", [False, True], ids=["scalar", "array"])
def test_plain_round_trip(tmp_path, use_mmap, label_as_array):
    images = make_images()
    rec, idx_path = write_plain_rec(tmp_path, images, label_as_array=label_as_array)
    idx = read_idx(idx_path)
    assert [key for key, _ in idx] == list(range(len(images)))
    assert read_property(tmp_path / "property") == (3, 112, 112, len(images))
    with RecordReader(rec, use_mmap=use_mmap) as reader:
        layout = detect_layout(reader, *zip(*idx))
        assert (layout.style, layout.image_keys.tolist(), layout.identity_keys.tolist()) == ("plain", list(range(9)), [])
        for (key, offset), (label, jpeg) in zip(idx, images):
            flag, labels, _, _, image = reader.read_image_record(offset, key)
            assert (flag, labels, image) == ((1 if label_as_array else 0), (float(label),), jpeg)


@BOTH_BACKENDS
@pytest.mark.parametrize("label_as_array", [False, True], ids=["scalar", "array"])
def test_insightface_round_trip(tmp_path, use_mmap, label_as_array):
    images = make_images(n=10, classes=4)
    rec, idx_path = write_insightface_rec(tmp_path, images, label_as_array=label_as_array)
    idx = read_idx(idx_path)
    offsets = dict(idx)
    assert read_property(tmp_path / "property") == (4, 112, 112, None)
    with RecordReader(rec, use_mmap=use_mmap) as reader:
        assert reader.read_image_record(offsets[0], 0)[:2] == (2, (11.0, 15.0))
        layout = detect_layout(reader, *zip(*idx))
        assert (layout.style, layout.image_keys.tolist(), layout.identity_keys.tolist()) == (
            "insightface", list(range(1, 11)), list(range(11, 15)))
        stored = [reader.read_image_record(offsets[k], k) for k in layout.image_keys.tolist()]
        assert [(int(r[1][0]), r[4]) for r in stored] == sorted(images, key=lambda item: item[0])
        for class_id, key in enumerate(layout.identity_keys.tolist()):  # each identity range holds that class's images
            begin, end = map(int, reader.read_image_record(offsets[key], key)[1])
            assert {int(stored[k - 1][1][0]) for k in range(begin, end)} <= {class_id}
            assert end - begin == sum(label == class_id for label, _ in images)


def test_pack_unpack_image_record():
    assert unpack_image_record(pack_image_record(7, b"img", id=5, id2=6)) == (0, (7.0,), 5, 6, b"img")
    assert unpack_image_record(pack_image_record([1.5, -2.0], b"img")) == (2, (1.5, -2.0), 0, 0, b"img")
    header = struct.pack("<IfQQ", 1, 99.0, 0, 0)  # flag > 0: the header's own label field is ignored
    assert unpack_image_record(header + struct.pack("<f", 3.0) + b"x")[1] == (3.0,)


# ---- multi-part records ----

@pytest.mark.parametrize("payload, flags", [
    (b"abcd" + MAGIC_BYTES + b"efghijkl" + MAGIC_BYTES + b"xyz", [1, 2, 3]),
    (MAGIC_BYTES + b"abcd" + MAGIC_BYTES + MAGIC_BYTES + b"z", [1, 2, 2, 3]),  # at 0, back to back
    (b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES, [1, 2, 3]),  # at the very end: empty last part
    (b"a" + MAGIC_BYTES + b"bc", [0]),  # unaligned: stays one part
    (b"ab" + MAGIC_BYTES + b"cd" + MAGIC_BYTES[:3], [0]),
], ids=["middle", "start-and-consecutive", "end", "unaligned", "unaligned-and-partial"])
@BOTH_BACKENDS
def test_magic_inside_payload(tmp_path, payload, flags, use_mmap):
    rec = tmp_path / "m.rec"
    idx = write_recordio(rec, tmp_path / "m.idx", [(0, payload), (1, b"after")])
    assert part_flags(rec) == flags + [0]
    with RecordReader(rec, use_mmap=use_mmap) as reader:
        assert reader.read_at(idx[0][1], 0) == payload
        assert list(reader.scan()) == [(idx[0][1], payload), (idx[1][1], b"after")]


def test_writer_bytes_match_dmlc_layout(tmp_path):
    rec = tmp_path / "x.rec"
    write_recordio(rec, tmp_path / "x.idx", [(0, b"abcd" + MAGIC_BYTES + b"e"), (1, b"")])
    assert rec.read_bytes() == raw_part(1, b"abcd") + raw_part(3, b"e") + raw_part(0, b"")
    assert rec.read_bytes()[20:24] == b"e\0\0\0"  # data padded with zeros to 4 bytes


@BOTH_BACKENDS
def test_random_access_equals_scan(tmp_path, use_mmap):
    rng = random.Random(3)
    payloads = [fake_jpeg(rng, rng.randrange(0, 50)) for _ in range(30)]
    payloads[7] = b"head" + MAGIC_BYTES + b"body" + MAGIC_BYTES + b"tail"
    keys = rng.sample(range(1000), len(payloads))  # keys are arbitrary ints
    idx = write_recordio(tmp_path / "r.rec", tmp_path / "r.idx", zip(keys, payloads))
    assert read_idx(tmp_path / "r.idx") == idx
    with RecordReader(tmp_path / "r.rec", use_mmap=use_mmap) as reader:
        scanned = list(reader.scan())
        assert [offset for offset, _ in scanned] == [offset for _, offset in idx]
        for (key, offset) in rng.sample(idx, len(idx)):
            assert reader.read_at(offset, key) == dict(scanned)[offset]


# ---- malformed .rec ----

def cut_file(tmp_path, size: int):
    rec = tmp_path / "t.rec"
    idx = write_recordio(rec, tmp_path / "t.idx", [(0, b"x" * 40), (1, b"y" * 40)])
    rec.write_bytes(rec.read_bytes()[:size])
    return rec, idx


@BOTH_BACKENDS
def test_truncated_in_data(tmp_path, use_mmap):
    rec, idx = cut_file(tmp_path, 48 + 8 + 20)  # second record: header intact, data cut
    with RecordReader(rec, use_mmap=use_mmap) as reader:
        with raises(r"t\.rec, key 1, byte offset 48: part length 40 runs past the end of the file \(76 bytes\)"):
            reader.read_at(48, key=1)
        with raises(r"t\.rec, record #1, byte offset 48: part length 40 runs past the end"):
            list(reader.scan())


def test_truncated_in_header(tmp_path):
    rec, _ = cut_file(tmp_path, 48 + 6)
    with RecordReader(rec) as reader, raises(r"byte offset 48: truncated file: a part header needs 8 bytes, 6 remain"):
        list(reader.scan())


@BOTH_BACKENDS
def test_wrong_magic(tmp_path, use_mmap):
    rec = write_raw(tmp_path, raw_part(0, b"good"), b"\x00\x00\x00\x00" + raw_part(0, b"bad!")[4:])
    with RecordReader(rec, use_mmap=use_mmap) as reader:
        with raises(r"forged\.rec, key 9, byte offset 12: bad magic 0x00000000 \(expected 0xced7230a\)"):
            reader.read_at(12, key=9)


def test_offset_past_end_and_misaligned(tmp_path):
    rec = write_raw(tmp_path, raw_part(0, b"abcd"))
    with RecordReader(rec) as reader:
        with raises(r"forged\.rec, key 3, byte offset 400: offset is past the end of the file \(12 bytes\)"):
            reader.read_at(400, key=3)
        with raises(r"byte offset 6: records start at non-negative multiples of 4"):
            reader.read_at(6)


def test_offset_into_middle_of_record(tmp_path):
    payload = b"abcd" + MAGIC_BYTES + b"efgh" + MAGIC_BYTES + b"ijkl"
    idx = write_recordio(tmp_path / "m.rec", tmp_path / "m.idx", [(0, payload)])
    assert part_flags(tmp_path / "m.rec") == [1, 2, 3]
    with RecordReader(tmp_path / "m.rec") as reader:
        with raises(r"key 0, byte offset 4: bad magic"):  # the lrecord word, not a magic
            reader.read_at(idx[0][1] + 4, key=0)
        with raises(r"key 0, byte offset 12: cflag 2 \(middle\) without a start part: the offset points into"):
            reader.read_at(12, key=0)
        with raises(r"byte offset 24: cflag 3 \(end\) without a start part"):
            reader.read_at(24)


def test_start_where_continuation_expected(tmp_path):
    rec = write_raw(tmp_path, raw_part(1, b"abcd"), raw_part(0, b"efgh"))
    with RecordReader(rec) as reader, raises(
            r"key 5, byte offset 12: cflag 0 \(whole\) where a middle or end part must follow a start "
            r"\(in the record starting at byte offset 0\)"):
        reader.read_at(0, key=5)


def test_invalid_cflag(tmp_path):
    rec = write_raw(tmp_path, raw_part(5, b"abcd"))
    with RecordReader(rec) as reader, raises(r"byte offset 0: invalid cflag 5"):
        reader.read_at(0)


@BOTH_BACKENDS
def test_absurd_length_raises_without_allocating(tmp_path, use_mmap):
    rec = write_raw(tmp_path, raw_part(0, b"abcd", length=0x1FFFFFFF))
    reader = RecordReader(rec, use_mmap=use_mmap)
    requested = []
    read = reader._read
    reader._read = lambda pos, n: requested.append(n) or read(pos, n)
    with raises(r"forged\.rec, key 0, byte offset 0: part length 536870911 runs past the end of the file \(12 bytes\)"):
        reader.read_at(0, key=0)
    assert requested == [8]  # only the part header was read
    reader.close()


def test_missing_rec(tmp_path):
    with raises(r"nope\.rec: record file not found"):
        RecordReader(tmp_path / "nope.rec")


def test_payload_shorter_than_irheader(tmp_path):
    rec = tmp_path / "s.rec"
    idx = write_recordio(rec, tmp_path / "s.idx", [(4, b"short"), (5, struct.pack("<IfQQ", 3, 0, 0, 0) + b"1234")])
    with RecordReader(rec) as reader:
        with raises(r"s\.rec, key 4, byte offset 0: payload of 5 bytes is shorter than the 24-byte IRHeader"):
            reader.read_image_record(idx[0][1], 4)
        with raises(rf"key 5, byte offset {idx[1][1]}: IRHeader flag 3 announces 12 bytes of float32 labels, "
                    r"but only 4 bytes follow the header"):
            reader.read_image_record(idx[1][1], 5)


# ---- malformed .idx / property ----

def test_missing_idx_and_property(tmp_path):
    with raises(r"train\.idx: index file not found"):
        read_idx(tmp_path / "train.idx")
    with raises(r"property: property file not found"):
        read_property(tmp_path / "property")


@pytest.mark.parametrize("text, message", [
    ("0\t0\n1\tabc\n", r"line 2: expected 'key<TAB>offset' \(two integers\), got '1\\tabc'"),
    ("0\t0\t7\n", r"line 1: expected 'key<TAB>offset'"),
    ("0\t0\n\n0\t8\n", r"line 3: duplicate key 0"),
    ("0\t-8\n", r"line 1: negative offset -8"),
])
def test_malformed_idx(tmp_path, text, message):
    (tmp_path / "bad.idx").write_text(text)
    with raises(r"bad\.idx, " + message):
        read_idx(tmp_path / "bad.idx")


def test_idx_tolerates_spaces_and_blank_lines(tmp_path):
    (tmp_path / "ok.idx").write_text("0 0\n\n 3\t16 \n")
    assert read_idx(tmp_path / "ok.idx") == [(0, 0), (3, 16)]


@pytest.mark.parametrize("text, message", [
    ("85742;112;112\n", r"line 1: expected 'num_classes,height,width', got '85742;112;112'"),
    ("85742,112\n", r"line 1: expected 'num_classes,height,width'"),
    ("10,112,112\nmany\n", r"line 2: expected an image count, got 'many'"),
    ("10,112,112\n5\n6\n", r"got 3 non-empty lines"),
    ("", r"got 0 non-empty lines"),
    ("0,112,112\n", r"values must be positive"),
    ("10,112,112\n\xe9\n", r"not ASCII text"),
])
def test_malformed_property(tmp_path, text, message):
    (tmp_path / "property").write_text(text, encoding="latin-1")
    with raises(re.escape(str(tmp_path / "property")) + r".*" + message):
        read_property(tmp_path / "property")


# ---- layout cross-checks: image keys come from the .idx ----

def test_header_range_disagrees_with_idx(tmp_path):
    rec, idx_path = write_insightface_rec(tmp_path, make_images(n=6))
    idx = [(key, offset) for key, offset in read_idx(idx_path) if key != 4]  # an image lost from the .idx
    with RecordReader(rec) as reader, raises(
            r"train\.rec: the header says images are keys 1\.\.6, but the \.idx has 5 keys in that range "
            r"\(first missing: 4\)"):
        detect_layout(reader, *zip(*idx))


def test_header_boundary_on_an_image(tmp_path):
    images = make_images(n=6)
    rec, idx_path = write_insightface_rec(tmp_path, images)
    records = [(0, pack_image_record([4, 7], b""))] + [(k, pack_image_record(lab, jpg))
                                                       for k, (lab, jpg) in enumerate(images, 1)]
    idx = write_recordio(rec, idx_path, records)  # header claims identities start at key 4: it is an image
    with RecordReader(rec) as reader, raises(
            rf"train\.rec, key 4, byte offset {dict(idx)[4]}: the header says identity records start at key 4, "
            r"but that record is an image"):
        detect_layout(reader, *zip(*idx))


def test_header_with_bad_range(tmp_path):
    idx = write_recordio(tmp_path / "h.rec", tmp_path / "h.idx", [(0, pack_image_record([0, 3], b""))])
    with RecordReader(tmp_path / "h.rec") as reader, raises(
            r"h\.rec, key 0, byte offset 0: header labels \[0\.0, 3\.0\] are not a \[first_identity_key, end_key\]"):
        detect_layout(reader, *zip(*idx))


def test_header_with_infinite_range(tmp_path):
    idx = write_recordio(tmp_path / "h.rec", tmp_path / "h.idx", [(0, pack_image_record([float("inf")] * 2, b""))])
    with RecordReader(tmp_path / "h.rec") as reader, raises(
            r"h\.rec, key 0, byte offset 0: header labels \[inf, inf\] are not a \[first_identity_key, end_key\]"):
        detect_layout(reader, *zip(*idx))


def test_record0_image_with_array_label_is_plain(tmp_path):
    rec, idx_path = write_plain_rec(tmp_path, make_images(n=4), label_as_array=True)
    with RecordReader(rec) as reader:
        assert detect_layout(reader, *zip(*read_idx(idx_path))).style == "plain"


def test_boundary_above_float32_exact_range_is_probed(tmp_path):
    # Keys just above 2^24 (a sparse .idx is enough): the header float rounds the first identity key.
    first_identity = FLOAT32_EXACT + 3
    rounded = struct.unpack("<f", struct.pack("<f", first_identity))[0]
    assert rounded != first_identity
    rng = random.Random(5)
    records = [(k, pack_image_record(1, fake_jpeg(rng))) for k in range(FLOAT32_EXACT - 2, first_identity)]
    records += [(k, pack_image_record([1, 2], b"")) for k in range(first_identity, first_identity + 4)]
    idx = write_recordio(tmp_path / "big.rec", tmp_path / "big.idx", records)
    with RecordReader(tmp_path / "big.rec") as reader:
        assert _first_identity_key(reader, dict(idx), rounded) == first_identity
        no_identity = dict(idx[:5])
        with raises(r"no identity record within 2 keys of the header's \(float32-rounded\) first identity key"):
            _first_identity_key(reader, no_identity, rounded)


def test_reader_pickles_by_path(tmp_path):
    idx = write_recordio(tmp_path / "p.rec", tmp_path / "p.idx", [(0, b"payload")])
    with RecordReader(tmp_path / "p.rec") as reader, pickle.loads(pickle.dumps(reader)) as copy:
        assert copy.read_at(idx[0][1]) == b"payload"


def test_forked_child_reopens_buffered_file(tmp_path):
    # A DataLoader worker must not share the parent's file position: the child reopens on first read.
    idx = write_recordio(tmp_path / "f.rec", tmp_path / "f.idx", [(0, b"first"), (1, b"second")])
    reader = RecordReader(tmp_path / "f.rec", use_mmap=False)
    parent_file = reader._file
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            ok = reader.read_at(idx[1][1]) == b"second" and reader._file is not parent_file
            os.write(write_end, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"1"
    assert reader.read_at(idx[0][1]) == b"first"  # the parent's handle survived the child's close
    reader.close()


@pytest.mark.parametrize("text", [
    "0\t0\n1\t40\n",
    "5\t8\n3\t0\n9\t16",  # any key order, no final newline
    "0 0\r\n1  40\r\n",  # spaces, Windows line ends
    "0\t0\n\n1\t40\n",  # a blank line: the bulk parser declines, read_idx accepts
    "+0\t0\n1\t40\n",  # a sign: likewise
    "",
])
def test_read_idx_arrays_equals_read_idx(tmp_path, text):
    path = tmp_path / "train.idx"
    path.write_text(text)
    keys, offsets = read_idx_arrays(path, block_bytes=4)  # tiny blocks: the line-end split is exercised
    assert list(zip(keys.tolist(), offsets.tolist())) == read_idx(path)
    assert keys.dtype == offsets.dtype == np.int64


@pytest.mark.parametrize("text, message", [
    ("0\t0\n1\t40\t7\n", "line 2: expected 'key<TAB>offset'"),
    ("0\t0\n1\n", "line 2: expected 'key<TAB>offset'"),
    ("0\t0\n0\t40\n", "line 2: duplicate key 0"),
    ("0\t0\n1\t-4\n", "line 2: negative offset -4"),
    ("0\t0\n1\t99999999999999999999999\n", "entry 2: 99999999999999999999999 does not fit a 64-bit integer"),
])
def test_read_idx_arrays_errors_are_read_idx_errors(tmp_path, text, message):
    path = tmp_path / "train.idx"
    path.write_text(text)
    with pytest.raises(RecordIOError, match=re.escape(f"{path}, {message}")):
        read_idx_arrays(path)
