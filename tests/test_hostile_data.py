"""Training data that must stop a run, checked by construction: a shard is exactly the schema data_prep writes
(column names, order, types), valid Arrow, uncompressed, without nulls, with labels in [0, num_classes) and images
of bounded size, all before any rank starts; an image is a JPEG or a PNG by its magic bytes before any decoder
sees it, and its size is read from its header before it is decoded; manifest.json is bounded and every value
range-checked. Real shards written with pyarrow and `datasets`, real images, the real pre-flight and loader.
"""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ds_face.data.arrow import ArrowFaces, DataError
from ds_face.data.loader import Loader
from ds_face.data.order import BatchLayout
from ds_face.data.shards import (
    MANIFEST, MAX_MANIFEST_BYTES, SCHEMA, Manifest, ShardError, ShardInfo, check_shard_files, read_manifest,
    sha256_of, shard_name,
)
from tests.conftest import ROOT, index_png, write_shards

ROWS, CLASSES = 40, 10


def rows_table(**columns) -> pa.Table:
    """The rows data_prep would write (image i spells i, label i % 10, index i), with ``columns`` replaced
    (a pyarrow array, or None to drop the column) or added."""
    base = {"image": pa.array([index_png(i) for i in range(ROWS)], pa.binary()),
            "label": pa.array([i % CLASSES for i in range(ROWS)], pa.int64()),
            "index": pa.array(range(ROWS), pa.int64())}
    base.update(columns)
    return pa.table({k: v for k, v in base.items() if v is not None})


def write_dataset(directory: Path, table: pa.Table, *, options=None, batch_rows=16, num_classes=CLASSES) -> Path:
    """One shard holding ``table`` as an Arrow stream, and a manifest that matches it (size, sha256, rows), so
    that only the shard's content is wrong."""
    directory.mkdir(parents=True)
    name = shard_name(0, 1)
    with pa.OSFile(str(directory / name), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=batch_rows)
    info = ShardInfo(name, table.num_rows, (directory / name).stat().st_size, sha256_of(directory / name))
    Manifest(num_samples=table.num_rows, num_classes=num_classes, shards=[info]).write(directory)
    return directory


def refit_manifest(directory: Path) -> None:
    """After a shard's bytes were changed in place: its manifest size and sha256 follow."""
    manifest = read_manifest(directory)
    for shard in manifest.shards:
        shard.bytes, shard.sha256 = (directory / shard.file).stat().st_size, sha256_of(directory / shard.file)
    manifest.write(directory)


def first_batch(directory: Path, workers: int = 0, on_corrupt: str = "skip") -> dict:
    loader = Loader(ArrowFaces(directory, on_corrupt=on_corrupt), BatchLayout(ROWS, 1, 1, 0), streams=1,
                    num_workers=workers)
    batches = list(loader.micro_batches(0, ROWS))
    return {**batches[0], "corrupt": loader.corrupt_images}


def refused_everywhere(directory: Path, expect: str) -> str:
    """The pre-flight (every rank runs it before any process group) and the loader (its one shard reader)
    refuse ``directory`` with the same one-line message; returns it."""
    with pytest.raises(ShardError, match=expect) as preflight:
        check_shard_files(read_manifest(directory), directory)
    with pytest.raises(DataError, match=expect) as loader:
        first_batch(directory)
    message = str(preflight.value)
    assert "\n" not in message and message in str(loader.value)
    assert str(directory / shard_name(0, 1)) in message
    return message


# -- the schema: exactly what data_prep writes ----------------------------------------------------------------

def test_a_shard_as_data_prep_writes_it_passes_and_trains(tmp_path):
    directory = write_dataset(tmp_path / "ds", rows_table())
    check_shard_files(read_manifest(directory), directory, full_hash=True)
    batch = first_batch(directory)
    assert sorted(batch["label"].tolist()) == sorted(i % CLASSES for i in range(ROWS)) and batch["corrupt"] == 0


LABELS = list(range(ROWS))
SCHEMAS = {
    "float label": (dict(label=pa.array([i % CLASSES + 0.7 for i in LABELS], pa.float64())),
                    r": column 'label' is double, expected int64$"),
    "int8 label, negative": (dict(label=pa.array([-(i % CLASSES) for i in LABELS], pa.int8())),
                             r": column 'label' is int8, expected int64$"),
    "int32 label": (dict(label=pa.array([i % CLASSES for i in LABELS], pa.int32())),
                    r": column 'label' is int32, expected int64$"),
    "uint64 label": (dict(label=pa.array([i % CLASSES for i in LABELS], pa.uint64())),
                     r": column 'label' is uint64, expected int64$"),
    "dictionary label": (dict(label=pa.array([i % CLASSES for i in LABELS], pa.int64()).dictionary_encode()),
                         r": column 'label' is dictionary<values=int64, indices=int32, ordered=0>, expected int64$"),
    "string label": (dict(label=pa.array([str(i % CLASSES) for i in LABELS])),
                     r": column 'label' is string, expected int64$"),
    "no index": (dict(index=None), r": no 'index' column; data_prep writes exactly image: binary, label: int64, "
                                   r"index: int64$"),
    "no label": (dict(label=None), r": no 'label' column"),
    "extra column": (dict(path=pa.array([f"/x/{i}.jpg" for i in LABELS])),
                     r": column 'path' \(string\) is not one data_prep writes \(image: binary, label: int64, "
                     r"index: int64\)$"),
    "large_binary image": (dict(image=pa.array([index_png(i) for i in LABELS], pa.large_binary())),
                           r": column 'image' is large_binary, expected binary$"),
    "string image": (dict(image=pa.array(["x"] * ROWS, pa.string())),
                     r": column 'image' is string, expected binary$"),
    "list label": (dict(label=pa.array([[i % CLASSES] for i in LABELS])),
                   r": column 'label' is list<item: int64>, expected int64$"),
}


@pytest.mark.parametrize("case", list(SCHEMAS))
def test_a_shard_of_another_schema_is_refused_before_any_rank(tmp_path, case):
    columns, expect = SCHEMAS[case]
    refused_everywhere(write_dataset(tmp_path / "ds", rows_table(**columns)), expect)


def test_columns_in_another_order_or_twice_are_refused(tmp_path):
    table = rows_table()
    reordered = table.select(["label", "image", "index"])
    refused_everywhere(write_dataset(tmp_path / "a", reordered),
                       r": columns label, image, index; data_prep writes exactly image: binary, label: int64, ")
    twice = pa.Table.from_arrays([*table.columns, table.column("label")], names=["image", "label", "index", "label"])
    refused_everywhere(write_dataset(tmp_path / "b", twice), r": columns image, label, index, label; ")


def test_a_shard_written_by_datasets_is_accepted_and_its_image_feature_refused(tmp_path):
    """`datasets` writes the same Arrow stream with its features in the schema metadata: accepted when the
    columns are data_prep's; its Image() feature (a struct of bytes and path) is not an image column of ours."""
    import datasets
    rows = {"image": [index_png(i) for i in LABELS], "label": [i % CLASSES for i in LABELS], "index": LABELS}
    plain = datasets.Features({"image": datasets.Value("binary"), "label": datasets.Value("int64"),
                               "index": datasets.Value("int64")})
    for name, features, expect in [
        ("plain", plain, None),
        ("image", datasets.Features({**plain, "image": datasets.Image()}),
         r": column 'image' is struct<bytes: binary, path: string>, expected binary$")]:
        saved = tmp_path / f"saved_{name}"
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(saved))
        shard = next(saved.glob("*.arrow"))
        directory = tmp_path / name
        directory.mkdir()
        shard.rename(directory / shard_name(0, 1))
        info = ShardInfo(shard_name(0, 1), ROWS, (directory / shard_name(0, 1)).stat().st_size,
                         sha256_of(directory / shard_name(0, 1)))
        Manifest(num_samples=ROWS, num_classes=CLASSES, shards=[info]).write(directory)
        if expect is None:
            assert b"huggingface" in pa.ipc.open_stream(pa.memory_map(str(directory / info.file))).schema.metadata
            check_shard_files(read_manifest(directory), directory)
            assert first_batch(directory)["corrupt"] == 0
        else:
            refused_everywhere(directory, expect)


# -- the values: labels, nulls, sizes, valid Arrow ------------------------------------------------------------

@pytest.mark.parametrize("label,row", [(-1, 21), (CLASSES, 37), (2**62, 0)])
def test_a_label_outside_the_classes_is_refused_naming_row_and_index(tmp_path, label, row):
    labels = [i % CLASSES for i in LABELS]
    labels[row] = label
    directory = write_dataset(tmp_path / "ds", rows_table(label=pa.array(labels, pa.int64())))
    refused_everywhere(directory, rf", row {row} \(index {row}\): label {label} outside \[0, {CLASSES}\) "
                                  rf"\(num_classes in manifest.json\)$")


@pytest.mark.parametrize("column", ["label", "index", "image"])
def test_a_null_is_refused(tmp_path, column):
    table = rows_table()
    values = table.column(column).to_pylist()
    values[19] = None
    directory = write_dataset(tmp_path / "ds", table.set_column(table.schema.get_field_index(column), column,
                                                                pa.array(values, SCHEMA.field(column).type)))
    refused_everywhere(directory, rf", row 19: '{column}' is null \(1 null\(s\) in record batch 1\); data_prep "
                                  rf"writes no nulls$")


def test_a_huge_image_row_is_refused_from_the_offsets(tmp_path):
    """One 17 MiB image in a row: refused from the offsets, before any image byte is read (a PNG is copied
    whole to be decoded)."""
    images = [index_png(i) for i in LABELS]
    images[5] = index_png(5) + bytes(17 << 20)
    directory = write_dataset(tmp_path / "ds", rows_table(image=pa.array(images, pa.binary())))
    refused_everywhere(directory, r", row 5: an image of 17\d{6} bytes, more than the 16 MiB an image may take$")


def test_the_converters_refuse_an_image_the_trainer_would_refuse(tmp_path, capsys):
    """folder2arrow: an image file over MAX_IMAGE_BYTES is named from the listing, before anything is read or
    written (rec2arrow's records go through the same check, data_prep.source.image_problem)."""
    from data_prep import folder2arrow
    src = tmp_path / "faces"
    for identity in ("ann", "bob"):
        (src / identity).mkdir(parents=True)
        for k in range(3):
            (src / identity / f"{k}.png").write_bytes(index_png(k))
    with open(src / "bob" / "1.png", "ab") as f:
        f.truncate(17 << 20)
    assert folder2arrow.main([str(src), str(tmp_path / "out"), "--workers", "1"]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [f"error: {src / 'bob' / '1.png'}, key 4, byte offset 0: an image of {17 << 20} bytes, more than "
                   f"the 16 MiB an image may take"]
    assert not (tmp_path / "out" / MANIFEST).exists()


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_a_compressed_shard_is_refused_before_it_is_inflated(tmp_path, codec):
    """IPC body compression: pyarrow would inflate each record batch whole to read it (a few KB of zstd can
    declare gigabytes). data_prep writes uncompressed shards; the flag is read from the message itself."""
    images = [bytes(1 << 20)] * 4  # 4 MiB of zeros compress to almost nothing
    table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array([0, 1, 2, 3], pa.int64()),
                      "index": pa.array([0, 1, 2, 3], pa.int64())})
    directory = write_dataset(tmp_path / "ds", table, options=pa.ipc.IpcWriteOptions(compression=codec))
    assert (directory / shard_name(0, 1)).stat().st_size < 1 << 20
    with pytest.raises(ShardError, match=r": record batch 0 is compressed; data_prep writes uncompressed shards$"):
        check_shard_files(read_manifest(directory), directory)


def test_offsets_that_point_outside_the_data_are_refused(tmp_path):
    """A shard whose image offsets were rewritten to point past the image bytes (the loader slices images by
    them): not valid Arrow, refused by a full validation of every record batch."""
    directory = write_dataset(tmp_path / "ds", rows_table(), batch_rows=ROWS)
    path = directory / shard_name(0, 1)
    data = bytearray(path.read_bytes())
    lengths = [len(index_png(i)) for i in LABELS]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype("<i4").tobytes()
    at = data.find(offsets)
    assert at > 0
    data[at + 4 * 7:at + 4 * 8] = struct.pack("<i", 2**31 - 1)  # image 6 ends far past the data
    path.write_bytes(bytes(data))
    refit_manifest(directory)
    refused_everywhere(directory, r": record batch 0 is not valid Arrow \(")


@pytest.mark.parametrize("content,expect", [
    (b"\xff\xff\xff\xff" + bytes(1020), r": an Arrow stream must open with its schema, found nothing$"),
    (b"\xff\xff\xff\xff\xf0\x00\x00\x00" + bytes(1016), r": not a readable Arrow stream \(OSError: Invalid "
                                                        r"flatbuffers message\.\)$"),
], ids=["marker then zeros", "marker, length, zeros"])
def test_a_stream_that_is_not_arrow_is_named(tmp_path, content, expect):
    directory = write_dataset(tmp_path / "ds", rows_table())
    (directory / shard_name(0, 1)).write_bytes(content)
    refit_manifest(directory)
    refused_everywhere(directory, expect)


def test_the_run_preflight_and_the_train_command_refuse_before_any_rank(tmp_path, capsys):
    from ds_face import train
    from ds_face.config import ConfigError, load_run_config
    directory = write_dataset(tmp_path / "ds", rows_table(label=pa.array([i % CLASSES + 0.5 for i in LABELS])))
    overrides = {"data.source": "arrow", "data.path": str(directory), "head.num_classes": CLASSES,
                 "output.dir": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match=r"'data.path': .*data-00000-of-00001\.arrow \(shards\[0\] of .*: column "
                                          r"'label' is double, expected int64"):
        load_run_config(ROOT / "configs" / "cpu_demo.yaml", overrides)
    args = ["--config", str(ROOT / "configs" / "cpu_demo.yaml"), "--deepspeed_config",
            str(ROOT / "ds_configs" / "cpu_zero2_fp32.json")]
    args += [x for key, value in overrides.items() for x in ("--set", f"{key}={value}")]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "column 'label' is double, expected int64" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing started


# -- images: JPEG and PNG by their magic bytes, sizes from the header ---------------------------------------

def encoded(fmt: str, size=(112, 112), mode="RGB", **options) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, 90).save(out, format=fmt, **options)
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def with_image(tmp_path: Path, image: bytes, row: int = 7) -> Path:
    images = [index_png(i) for i in LABELS]
    images[row] = image
    return write_dataset(tmp_path / "ds", rows_table(image=pa.array(images, pa.binary())))


OTHER_FORMATS = {
    "GIF": lambda: encoded("GIF"), "BMP": lambda: encoded("BMP"), "WebP": lambda: encoded("WEBP"),
    "TIFF": lambda: encoded("TIFF"), "ICO": lambda: encoded("ICO"), "PPM": lambda: encoded("PPM"),
    "garbage": lambda: b"not an image at all", "empty": lambda: b"",
    "GIF named by a JPEG's first byte": lambda: b"\xff" + encoded("GIF"),
}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("fmt", list(OTHER_FORMATS))
def test_an_image_of_another_format_stops_the_run_whatever_on_corrupt_says(tmp_path, fmt, workers):
    """data_prep's converters write JPEG and PNG only; anything else in a shard means a shard data_prep did not
    write: a refusal (on_corrupt skips damaged images of ours), one line from a DataLoader worker too."""
    image = OTHER_FORMATS[fmt]()
    directory = with_image(tmp_path, image)
    check_shard_files(read_manifest(directory), directory)  # image bytes are not read before training
    what = f"starts with {image[:8].hex(' ')}" if image else "empty"
    for on_corrupt in ("skip", "fail"):
        with pytest.raises(DataError) as err:
            first_batch(directory, workers, on_corrupt)
        message = str(err.value)
        assert "\n" not in message and "Traceback" not in message
        assert message.startswith(f"{directory / shard_name(0, 1)}, row 7 (dataset row 7, label 7): not a JPEG "
                                  f"or PNG image ({what}); "), message
        assert message.endswith("data_prep writes only JPEG and PNG, so this shard was not written by it "
                                "(data.on_corrupt skips damaged images, not other formats)")


def test_verify_reads_every_image_format_and_the_schema(tmp_path, capsys):
    """data_prep.verify reads every byte (the sha256) anyway: it also names an image of another format, which
    the trainer only meets when it reaches that row."""
    from data_prep import verify
    directory = with_image(tmp_path, encoded("GIF"))
    assert verify.main([str(directory), "--workers", "1"]) == 1
    assert capsys.readouterr().err.strip() == ("error: data-00000-of-00001.arrow, row 7 (index 7): not a JPEG or PNG "
                                               "image (starts with 47 49 46 38 37 61 70 00)")
    directory = write_dataset(tmp_path / "float", rows_table(label=pa.array([0.5] * ROWS)))
    assert verify.main([str(directory), "--workers", "1"]) == 1
    assert capsys.readouterr().err.strip() == ("error: data-00000-of-00001.arrow: column 'label' is double, "
                                               "expected int64")


def _huge_png() -> bytes:
    png = encoded("PNG")
    return png[:16] + struct.pack(">II", 100000, 100000) + png[24:]  # the IHDR says 100000x100000


def _second_ihdr() -> bytes:
    png = encoded("PNG")  # signature (8) + IHDR chunk (25): a second IHDR after it, 13000x13000
    return png[:33] + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 13000, 13000, 8, 2, 0, 0, 0)) + png[33:]


DAMAGED = {  # JPEG or PNG by their magic, but not a 112x112 image that decodes: on_corrupt decides
    "truncated JPEG": (lambda: encoded("JPEG")[:300], r"cannot decode image: "),
    "JPEG header 65500x65500": (lambda: _jpeg_sized(65500, 65500), r"image is 65500x65500, expected 112x112"),
    "PNG header 100000x100000": (_huge_png, r"image is 100000x100000, expected 112x112"),
    "PNG with a second IHDR of 13000x13000": (_second_ihdr, r"the header says 112x112, the decoder 13000x13000"),
    "PNG whose first chunk is not IHDR": (lambda: encoded("PNG")[:8] + png_chunk(b"tEXt", b"a\0b") +
                                          encoded("PNG")[8:], r"PNG without its IHDR header"),
    "PNG signature, GIF inside": (lambda: b"\x89PNG\r\n\x1a\n" + encoded("GIF"), r"PNG without its IHDR header"),
    "truncated PNG": (lambda: index_png(7)[:80], r"cannot decode image: "),
}


def _jpeg_sized(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) says width x height."""
    data = bytearray(encoded("JPEG", size=(16, 16)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_jpeg_or_png_is_a_corrupt_sample_read_from_its_header(tmp_path, case):
    make, expect = DAMAGED[case]
    directory = with_image(tmp_path, make())
    assert first_batch(directory, on_corrupt="skip")["corrupt"] == 1  # counted, another sample in its place
    with pytest.raises(DataError, match=rf", row 7 \(dataset row 7, label 7\): (cannot decode image: )?.*{expect}"):
        first_batch(directory, on_corrupt="fail")


def test_the_formats_that_are_ours_decode(tmp_path):
    """JPEG (and CMYK JPEG, through PIL told it is a JPEG), PNG of every colour type, and a JPEG followed by
    other bytes (a GIF): its trailing bytes are never read, its pixels are the JPEG's."""
    from ds_face.images import decode
    jpeg = encoded("JPEG")
    images = {0: jpeg, 1: encoded("JPEG", mode="CMYK"), 2: encoded("PNG", mode="L"), 3: encoded("PNG", mode="P"),
              4: encoded("PNG", mode="RGBA"), 5: encoded("PNG", mode="I;16"), 6: jpeg + encoded("GIF")}
    directory = write_shards(tmp_path / "ds", ROWS, 1, images=images)
    batch = first_batch(directory, on_corrupt="fail")
    assert batch["corrupt"] == 0
    assert np.array_equal(decode(jpeg + encoded("GIF")), decode(jpeg))


# -- manifest.json: bounded, every value range-checked --------------------------------------------------------

def edit(directory: Path, change) -> None:
    raw = json.loads((directory / MANIFEST).read_text())
    change(raw)
    (directory / MANIFEST).write_text(json.dumps(raw))


def setter(key, value):
    def change(raw):
        *parents, last = key
        for part in parents:
            raw = raw[part]
        raw[last] = value
    return change


MANIFESTS = {
    "num_classes 0": (setter(["num_classes"], 0), r"'num_classes' must be an integer in \[1, 2,147,483,647\], got 0"),
    "num_classes 2**31": (setter(["num_classes"], 2**31), r"'num_classes' must be an integer in \[1, 2,147,483,647\]"),
    "num_classes true": (setter(["num_classes"], True), r"'num_classes' must be an integer .*, got True"),
    "num_classes 10.0": (setter(["num_classes"], 10.0), r"'num_classes' must be an integer .*, got 10\.0"),
    "num_classes '10'": (setter(["num_classes"], "10"), r"'num_classes' must be an integer .*, got '10'"),
    "num_samples -40": (setter(["num_samples"], -40), r"'num_samples' must be an integer in \[1, 2\*\*46\]"),
    "num_samples off by one": (setter(["num_samples"], 41), r"num_samples 41 but the 1 shards hold 40 rows"),
    "rows 2**60": (setter(["shards", 0, "rows"], 2**60), r"'shards\[0\]\.rows' must be an integer in \[0, 2\*\*46\]"),
    "bytes 2**60": (setter(["shards", 0, "bytes"], 2**60), r"'shards\[0\]\.bytes' must be an integer in "
                                                          r"\[0, 2\*\*50\], got 1152921504606846976"),
    "image_size huge": (setter(["image_size"], [10**9, 10**9]), r"'image_size' must be \[height, width\], two "
                                                                r"integers in \[1, 4096\], got \[1000000000, "),
    "image_size one value": (setter(["image_size"], [112]), r"'image_size' must be \[height, width\]"),
    "image_size string": (setter(["image_size"], "112x112"), r"'image_size' must be \[height, width\]"),
    "unknown key": (setter(["evil"], {"__class__": 1}), r"'evil' is not a manifest key \(data_prep writes "),
    "shards a mapping": (setter(["shards"], {"file": "x"}), r"'shards' must be a non-empty list of shards"),
    "shards empty": (setter(["shards"], []), r"'shards' must be a non-empty list of shards, got \[\]"),
    "a shard a number": (setter(["shards", 0], 7), r"'shards\[0\]' must be a mapping of exactly file, rows, "),
    "a shard with an extra key": (setter(["shards", 0, "offset"], 0), r"'shards\[0\]' must be a mapping of exactly"),
    "sources a string": (setter(["sources"], "x"), r"'sources' must be a list, got 'x'"),
    "a source without a file": (setter(["sources"], [{"bytes": 1}]), r"'sources\[0\]' must be a mapping with a "),
    "a source of -1 bytes": (setter(["sources"], [{"file": "a", "bytes": -1}]),
                             r"'sources\[0\]\.bytes' must be an integer in \[0, 2\*\*50\], got -1"),
    "carried a path": (setter(["carried"], ["../../etc/passwd"]), r"'carried\[0\]' '\.\./\.\./etc/passwd' is a "
                                                                  r"path"),
    "converter a number": (setter(["converter"], 5), r"'converter' must be a short string, got 5"),
    "options a list": (setter(["options"], []), r"'options' must be a mapping, got \[\]"),
    "format_version true": (setter(["format_version"], True), r"format_version True; this ds_face reads 1"),
    "format_version '1'": (setter(["format_version"], "1"), r"format_version '1'; this ds_face reads 1"),
    "num_samples NaN": (setter(["num_samples"], float("nan")), r"'num_samples' must be an integer .*, got nan"),
    "an empty mapping": (lambda raw: raw.clear(), r"'format' is None, expected 'ds_face.arrow-shards'"),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_every_manifest_value_is_range_checked(tmp_path, case):
    change, expect = MANIFESTS[case]
    directory = write_dataset(tmp_path / "ds", rows_table())
    edit(directory, change)
    with pytest.raises(ShardError, match=expect) as err:
        read_manifest(directory)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(directory / MANIFEST))
    with pytest.raises(DataError, match=expect):
        ArrowFaces(directory)


@pytest.mark.parametrize("text,expect", [
    ("[" * 100_000 + "]" * 100_000, r"nested deeper than 32 levels \(line 1\)"),
    ('{"num_samples": 1' + "0" * 5000 + "}", r"not valid JSON: .*4300"),
    ("[1, 2, 3]", r"'format' is \[1, 2, 3\], expected 'ds_face.arrow-shards'"),
    ("\xff\xfe not text", r"not UTF-8 text"),
])
def test_a_manifest_that_is_not_a_small_json_mapping_is_one_line(tmp_path, text, expect):
    directory = tmp_path / "ds"
    directory.mkdir()
    (directory / MANIFEST).write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(ShardError, match=expect) as err:
        read_manifest(directory)
    assert "\n" not in str(err.value)


def test_a_huge_manifest_is_refused_unread(tmp_path):
    import resource
    directory = write_dataset(tmp_path / "ds", rows_table())
    with open(directory / MANIFEST, "r+b") as f:
        f.truncate(4 << 30)  # sparse: 4 GiB, zeros after the real manifest
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ShardError, match=rf"larger than {MAX_MANIFEST_BYTES} bytes; too large for a manifest "
                                         r"\(refused unread\)"):
        read_manifest(directory)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < (MAX_MANIFEST_BYTES >> 10) * 2


def test_the_manifest_is_read_once_per_process_and_again_once_it_changes(tmp_path):
    directory = write_dataset(tmp_path / "ds", rows_table())
    first = read_manifest(directory)
    assert read_manifest(directory) is first  # the config checks, num_classes: auto and the loader share one read
    assert ArrowFaces(directory).manifest is first
    edit(directory, setter(["num_classes"], 0))  # the same file, rewritten in place: read and checked again
    with pytest.raises(ShardError, match=r"'num_classes' must be an integer in \[1, 2,147,483,647\], got 0"):
        read_manifest(directory)
    with pytest.raises(DataError, match=r"'num_classes' must be an integer"):
        ArrowFaces(directory)
    edit(directory, setter(["num_classes"], 7))  # fixed: the new value, not the first read's
    assert read_manifest(directory).num_classes == 7 and first.num_classes == CLASSES
    Manifest(**{**first.__dict__, "num_classes": 9}).write(directory)  # replaced by another file (a rename)
    assert read_manifest(directory).num_classes == 9
