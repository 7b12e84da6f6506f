"""manifest.json is trusted only as far as the dataset directory: shard names confined to it, each shard's size
(and optionally sha256) checked against the manifest, every read error naming the shard. Real conversions
(data_prep.folder2arrow), real files, real pyarrow."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_prep import folder2arrow
from ds_face.data.shards import MANIFEST, ShardError, check_shard_files, naming_shard, read_manifest
from tests.conftest import encode


def convert(tmp_path: Path, name: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    src = tmp_path / f"{name}_faces"
    for identity in ("ann", "bob", "cid"):
        (src / identity).mkdir(parents=True)
        for k in range(4):
            (src / identity / f"{k}.png").write_bytes(encode(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)))
    out = tmp_path / name
    assert folder2arrow.main([str(src), str(out), "--workers", "1", "--shards", "2"]) == 0
    return out


@pytest.fixture
def dataset(tmp_path):
    return convert(tmp_path, "ds", 0)


def edit_manifest(directory: Path, **shard0) -> None:
    raw = json.loads((directory / MANIFEST).read_text())
    raw["shards"][0].update(shard0)
    (directory / MANIFEST).write_text(json.dumps(raw))


def test_a_real_conversion_passes(dataset):
    manifest = read_manifest(dataset)
    check_shard_files(manifest, dataset)
    check_shard_files(manifest, dataset, full_hash=True)
    assert all(Path(p).parent == dataset for p in manifest.shard_paths(dataset))


@pytest.mark.parametrize("name,expect", [
    ("/etc/passwd", r"'shards\[0\]\.file' '/etc/passwd' is a path; shards must be plain file names"),
    ("../../etc/passwd", r"'shards\[0\]\.file' '\.\./\.\./etc/passwd' is a path"),
    ("sub/data.arrow", r"'shards\[0\]\.file' 'sub/data\.arrow' is a path"),
    ("..", r"'shards\[0\]\.file' '\.\.' is not a file name"),
    ("", r"'shards\[0\]\.file' must be a file name, got ''"),
    (7, r"'shards\[0\]\.file' must be a file name, got 7"),
])
def test_shard_names_are_plain_file_names(dataset, name, expect):
    edit_manifest(dataset, file=name)
    with pytest.raises(ShardError, match=expect) as err:
        read_manifest(dataset)
    assert str(dataset / MANIFEST) in str(err.value)


@pytest.mark.parametrize("key,value,expect", [
    ("bytes", -1, r"'shards\[0\]\.bytes' must be an integer in \[0, 2\*\*50\], got -1"),
    ("rows", "6", r"'shards\[0\]\.rows' must be an integer in \[0, 2\*\*46\], got '6'"),
    ("sha256", "abc", r"'shards\[0\]\.sha256' must be 64 lowercase hex digits, got 'abc'"),
    ("rows", 10**12, r"'shards\[0\]\.rows' is 1000000000000, but the shard's \d+ bytes hold at most \d+ rows"),
])
def test_shard_fields_are_typed(dataset, key, value, expect):
    edit_manifest(dataset, **{key: value})
    with pytest.raises(ShardError, match=expect):
        read_manifest(dataset)


def test_a_symlink_out_of_the_directory_is_refused(dataset):
    manifest = read_manifest(dataset)
    first = dataset / manifest.shards[0].file
    first.unlink()
    first.symlink_to("/etc/passwd")
    with pytest.raises(ShardError, match=r"'shards\[0\]\.file' 'data-00000-of-00002\.arrow' is a symlink to "
                                         r"/etc/passwd, outside"):
        manifest.shard_paths(dataset)
    with pytest.raises(ShardError, match="is a symlink to /etc/passwd"):
        check_shard_files(manifest, dataset)


def test_a_symlink_inside_the_directory_and_a_linked_directory_are_fine(dataset, tmp_path):
    manifest = read_manifest(dataset)
    first = dataset / manifest.shards[0].file
    os.replace(first, dataset / "kept.arrow")
    first.symlink_to("kept.arrow")
    (tmp_path / "link").symlink_to(dataset)
    check_shard_files(manifest, tmp_path / "link", full_hash=True)


def test_an_empty_shard_is_named(dataset):
    manifest = read_manifest(dataset)
    path = dataset / manifest.shards[1].file
    path.write_bytes(b"")
    with pytest.raises(ShardError, match=rf"{path} \(shards\[1\] of .*manifest\.json\): 0 bytes, the manifest "
                                         rf"says {manifest.shards[1].bytes}: empty"):
        check_shard_files(manifest, dataset)


def test_a_foreign_shard_is_named(dataset, tmp_path):
    other = convert(tmp_path, "other", 1)
    manifest = read_manifest(dataset)
    name = manifest.shards[0].file
    shutil.copy(other / name, dataset / name)
    foreign = read_manifest(other).shards[0]
    if foreign.bytes != manifest.shards[0].bytes:  # sizes differ: the cheap check sees it
        with pytest.raises(ShardError, match=rf"{dataset / name} .*: {foreign.bytes} bytes, the manifest says "
                                             rf"{manifest.shards[0].bytes}"):
            check_shard_files(manifest, dataset)
    edit_manifest(dataset, bytes=foreign.bytes)  # the same size: only the hash tells
    manifest = read_manifest(dataset)
    check_shard_files(manifest, dataset)
    with pytest.raises(ShardError, match=rf"{dataset / name} .*: sha256 differs from the manifest's"):
        check_shard_files(manifest, dataset, full_hash=True)


def test_not_an_arrow_stream_is_named(dataset):
    manifest = read_manifest(dataset)
    path = dataset / manifest.shards[0].file
    path.write_bytes(b"x" * manifest.shards[0].bytes)
    with pytest.raises(ShardError, match=rf"{path} .*: not an Arrow IPC stream \(starts with b'xxxx'\)"):
        check_shard_files(manifest, dataset)


def test_a_missing_shard_is_named(dataset):
    manifest = read_manifest(dataset)
    (dataset / manifest.shards[1].file).unlink()
    with pytest.raises(ShardError, match=rf"{dataset / manifest.shards[1].file} .*: missing"):
        check_shard_files(manifest, dataset)


@pytest.mark.parametrize("content", [b"", b"\xff\xff\xff\xff\x10\x00\x00\x00garbage"])
def test_an_arrow_read_error_names_the_shard(tmp_path, content):
    path = tmp_path / "data-00000-of-00001.arrow"
    path.write_bytes(content)
    with pytest.raises(ShardError, match=rf"{path}: cannot read this Arrow shard \(ArrowInvalid: "):
        with naming_shard(path):
            with pa.ipc.open_stream(pa.OSFile(str(path))) as reader:
                reader.read_all()


def test_the_config_check_sees_a_bad_shard_before_any_rank(dataset, tmp_path):
    from ds_face.config import ConfigError, load_run_config
    manifest = read_manifest(dataset)
    (dataset / manifest.shards[0].file).write_bytes(b"")
    overrides = {"data.source": "arrow", "data.path": str(dataset), "head.num_classes": 3}
    with pytest.raises(ConfigError, match=r"'data\.path': .*data-00000-of-00002\.arrow .*: 0 bytes"):
        load_run_config(Path(__file__).parents[1] / "configs" / "cpu_demo.yaml", overrides)


def test_embed_refuses_an_escaping_manifest(dataset, tmp_path, capsys):
    from ds_face.eval import embed
    edit_manifest(dataset, file="../../../etc/passwd")
    assert embed.main(["--model", str(tmp_path / "none.pt"), "--arrow", str(dataset),
                       "--out", str(tmp_path / "e.npy")]) == 2
    assert "'shards[0].file' '../../../etc/passwd' is a path" in capsys.readouterr().err
