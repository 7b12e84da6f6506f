"""Hostile model files and archives: refused by every reader of model weights with one line naming the file and
the key, before anything is allocated from them; memory bombs refused with their peak memory measured.

The model files are real ``torch.save`` files of a real r_tiny (embedding 16) with one thing wrong; what
``torch.save`` cannot write (a negative stride, a storage smaller than its tensor, deflated or overlapping archive
entries, a legacy file declaring a huge storage) is crafted as torch's own format: a zip of ``data.pkl`` and
``data/<key>`` entries, the pickle written with torch's persistent ids. The CLIs are ``python -m ds_face.eval``,
``python -m ds_face.eval.embed`` and ``python -m ds_face.train --init-backbone``: real processes where their peak
memory is measured (the process's own ``ru_maxrss``, ``os.wait4`` in a small launcher: ``LAUNCHER``), their
``main(argv)`` in this process elsewhere (``run_in_process``).
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_face.backbones import get_backbone
from ds_face.training.init_backbone import BackboneFileError, check_backbone_file, load_backbone_file
from ds_face.checkpoint.safe_load import UnsafeFileError, load_weights_only, named_globals
from tests.conftest import encode, face

ROOT = Path(__file__).resolve().parents[1]
EMB = 16
MB = 1 << 20


def real_state() -> dict:
    torch.manual_seed(0)
    model = get_backbone("r_tiny", EMB)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_var.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- torch's zip format, written by hand ------------------------------------------------------------------

class Storage:
    """A storage in the pickle: torch's persistent id ('storage', <type>, key, 'cpu', numel)."""

    def __init__(self, key: str, numel: int, kind=torch.FloatStorage):
        self.key, self.numel, self.kind = key, numel, kind


class Tensor:
    """A tensor in the pickle, as torch.save writes one: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage: Storage, offset: int, size, stride):
        self.args = (storage, offset, torch.Size(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class Call:
    """A global called with arguments (e.g. bytearray(10**10))."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", obj.kind, obj.key, "cpu", obj.numel) if isinstance(obj, Storage) else None


def torch_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def torch_zip(path: Path, obj, records: dict[str, bytes], compress=zipfile.ZIP_STORED, names=None) -> Path:
    """``obj`` as ``archive/data.pkl`` and each record as ``archive/data/<key>``: what torch.load reads."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo("archive/data.pkl"), torch_pickle(obj))
        z.writestr("archive/byteorder", "little")
        for key, data in records.items():
            info = zipfile.ZipInfo((names or {}).get(key, f"archive/data/{key}"))
            info.compress_type = compress
            z.writestr(info, data)
        z.writestr("archive/version", "3\n")
    return path


def zip_bomb(path: Path, nbytes: int) -> Path:
    """A torch zip whose one float tensor is ``nbytes`` of zeros, deflated (streamed: never held in memory)."""
    n = nbytes // 4
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo("archive/data.pkl"), torch_pickle({"fc.weight": Tensor(Storage("0", n), 0, (n,),
                                                                                            (1,))}))
        z.writestr("archive/version", "3\n")
        info = zipfile.ZipInfo("archive/data/0")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:
            zeros = bytes(MB)
            for _ in range(nbytes // MB):
                f.write(zeros)
    return path


def legacy_file(path: Path, numel: int) -> Path:
    """torch's legacy (pre-1.6) format by hand: magic, protocol, sys info, the data pickle whose storage declares
    ``numel`` floats, the storage keys, then the storage: its element count and 16 bytes."""
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)

        class Legacy(_Pickler):
            def persistent_id(self, obj):
                return ("storage", obj.kind, obj.key, "cpu", obj.numel, None) if isinstance(obj, Storage) else None
        Legacy(f, protocol=2).dump({"w": Tensor(Storage("0", numel), 0, (4,), (1,))})
        pickle.dump(["0"], f, protocol=2)
        f.write(struct.pack("<q", numel) + bytes(16))
    return path


# -- model files: real torch.save files with one thing wrong ---------------------------------------------

def _set(state, key, value):
    state[key] = value
    return state


def _nan(state):
    state["conv1.weight"].view(-1)[7] = float("nan")
    return state


def _inf(state):
    state["fc.weight"][3, 5] = float("inf")
    return state


def _shared(state):
    state["bn1.bias"] = state["bn1.weight"]  # one tensor under two names: one storage
    return state


def _view_of_more(state):
    big = torch.zeros(100_000)
    state["conv1.weight"] = big[:216].view(8, 3, 3, 3)  # torch.save writes the whole 400 KB storage
    return state


def _rows_of(state, rows):
    state["fc.weight"] = torch.zeros(1, 1).expand(rows, state["fc.weight"].shape[1])
    return state


MODEL_FILES = {  # name: (damage, the line every reader prints)
    "int8": (lambda s: _set(s, "conv1.weight", s["conv1.weight"].to(torch.int8)),
             r"conv1\.weight is dtype int8, expected float32, float16 or bfloat16 \(the model's is float32\)"),
    "complex64": (lambda s: _set(s, "conv1.weight", s["conv1.weight"].to(torch.complex64)),
                  r"conv1\.weight is dtype complex64, expected float32, float16 or bfloat16"),
    "bool": (lambda s: _set(s, "fc.weight", s["fc.weight"] > 0), r"fc\.weight is dtype bool, expected float32"),
    "float64": (lambda s: _set(s, "conv1.weight", s["conv1.weight"].double()),
                r"conv1\.weight is dtype float64, expected float32, float16 or bfloat16"),
    "int32 counter": (lambda s: _set(s, "bn1.num_batches_tracked", torch.tensor(0, dtype=torch.int32)),
                      r"bn1\.num_batches_tracked is dtype int32, expected int64"),
    "nan": (_nan, r"conv1\.weight holds 1 non-finite value\(s\) \(first: nan\)"),
    "inf": (_inf, r"fc\.weight holds 1 non-finite value\(s\) \(first: inf\)"),
    "negative variance": (lambda s: _set(s, "bn1.running_var", -s["bn1.running_var"]),
                          r"bn1\.running_var holds a negative variance"),
    "wrong shape": (lambda s: _set(s, "conv1.weight", torch.zeros(8, 3, 5, 5)),
                    r"1 shape mismatches: conv1\.weight: file \[8, 3, 5, 5\] vs model \[8, 3, 3, 3\]"),
    "extra key": (lambda s: _set(s, "extra.weight", torch.zeros(3)), r"1 unexpected keys: extra\.weight"),
    "missing key": (lambda s: s.pop("bn1.bias") is not None and s, r"1 missing keys: bn1\.bias"),
    "expanded view": (lambda s: _rows_of(s, EMB), r"fc\.weight is an expanded or overlapping view \(shape \[16, 3136\], "
                                                  r"strides \[0, 0\]"),
    "expanded 12.5 GB": (lambda s: _rows_of(s, 1_000_000), r"fc\.weight is an expanded or overlapping view \(shape "
                                                          r"\[1000000, 3136\], strides \[0, 0\]"),
    "shared storage": (_shared, r"bn1\.bias is stored in the same storage as bn1\.weight"),
    "view of a larger storage": (_view_of_more, r"conv1\.weight is a view into a storage of 400000 bytes, not a "
                                                r"tensor of its own \(864 bytes\)"),
    "overlapping view": (lambda s: _set(s, "conv1.weight", torch.zeros(30).as_strided((8, 3, 3, 3), (3, 1, 1, 1))),
                         r"conv1\.weight is an expanded or overlapping view \(shape \[8, 3, 3, 3\], strides \[3, 1, 1, 1\]"),
    "sparse": (lambda s: _set(s, "conv1.weight", s["conv1.weight"].to_sparse()),
               r"refused to load: it names the global torch\._utils\._rebuild_sparse_tensor"),
    "quantized": (lambda s: _set(s, "conv1.weight", torch.quantize_per_tensor(s["conv1.weight"], 0.1, 0, torch.qint8)),
                  r"refused to load: it names the global torch\.(QInt8Storage|_utils\._rebuild_qtensor)"),
    "meta tensor": (lambda s: _set(s, "conv1.weight", torch.empty(8, 3, 3, 3, device="meta")),
                    r"refused to load: it names the global torch\._utils\._rebuild_meta_tensor_no_storage"),
}


def model_file(tmp_path: Path, name: str) -> Path:
    damage, _ = MODEL_FILES[name]
    path = tmp_path / f"{name.replace(' ', '_')}.pt"
    torch.save(damage(real_state()), path)
    return path


def test_an_intact_file_loads_and_its_variants_are_what_they_claim(tmp_path):
    """The untouched file loads everywhere; each damaged one really holds what its name says."""
    torch.save(real_state(), tmp_path / "ok.pt")
    model = load_backbone_file(tmp_path / "ok.pt", get_backbone("r_tiny", EMB), "r_tiny")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in real_state().items())
    raw = {name: torch.load(model_file(tmp_path, name), weights_only=False) for name in
           ("int8", "complex64", "nan", "expanded 12.5 GB", "shared storage", "view of a larger storage")}
    assert raw["int8"]["conv1.weight"].dtype == torch.int8 and raw["complex64"]["conv1.weight"].is_complex()
    assert raw["nan"]["conv1.weight"].isnan().sum() == 1
    fc = raw["expanded 12.5 GB"]["fc.weight"]  # what eval once built a 12.5 GB layer from
    assert fc.shape == (1_000_000, 3136) and fc.untyped_storage().nbytes() == 4
    assert (tmp_path / "expanded_12.5_GB.pt").stat().st_size < 600_000
    shared = raw["shared storage"]
    assert shared["bn1.bias"].untyped_storage().data_ptr() == shared["bn1.weight"].untyped_storage().data_ptr()
    assert raw["view of a larger storage"]["conv1.weight"].untyped_storage().nbytes() == 400_000


@pytest.mark.parametrize("name", list(MODEL_FILES))
def test_init_backbone_refuses_each_bad_model_file_naming_file_and_key(tmp_path, name):
    from ds_face.config import ModelConfig
    path = model_file(tmp_path, name)
    expect = MODEL_FILES[name][1]
    with pytest.raises(BackboneFileError, match=expect) as err:
        load_backbone_file(path, get_backbone("r_tiny", EMB), "r_tiny")
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    with pytest.raises(BackboneFileError, match=expect):  # train.main's check, on the meta device
        check_backbone_file(path, ModelConfig(backbone="r_tiny", embedding_size=EMB))


# -- the CLIs --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A valid .bin (10 pairs) and a valid image folder: only the model can fail."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    bins = [encode(face(i, rng)) for i in range(20)]
    (root / "pairs.bin").write_bytes(pickle.dumps((bins, [True, False] * 5)))
    (root / "faces" / "id0").mkdir(parents=True)
    (root / "faces" / "id0" / "a.png").write_bytes(bins[0])
    return root


def cli_args(kind: str, model: Path, inputs: Path, tmp_path: Path) -> list[str]:
    """The command line after ``python -m <module>``."""
    if kind == "eval":
        args = ["--model", model, "--bin", inputs / "pairs.bin", "--device", "cpu"]
    elif kind == "embed":
        args = ["--model", model, "--folder", inputs / "faces", "--out", tmp_path / f"e_{model.stem}.npy",
                "--device", "cpu"]
    else:
        args = ["--config", ROOT / "configs/cpu_demo.yaml", "--deepspeed_config",
                ROOT / "ds_configs/cpu_zero2_fp32.json", "--set", f"output.dir={tmp_path / 'run'}",
                "--set", f"model.embedding_size={EMB}", "--init-backbone", model]
    return [str(a) for a in args]


PROGS = {"eval": "ds_face.eval", "embed": "ds_face.eval.embed", "train": "ds_face.train"}  # module = prog name


def cli(kind: str, model: Path, inputs: Path, tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", PROGS[kind], *cli_args(kind, model, inputs, tmp_path)]


def run_in_process(kind: str, model: Path, inputs: Path, tmp_path: Path, capsys, monkeypatch) -> tuple[int, str]:
    """(exit code, stderr) of the command's ``main(argv)`` in this process, from the checkout as ``cli`` runs it;
    where no peak memory is measured. Nothing of this process is changed: eval and embed set up no logging,
    signal, environment or torch setting, and ``ds_face.train`` refuses a model file before its logging and
    process group start."""
    from ds_face import train
    from ds_face.eval import embed, verification
    main = {"eval": verification.main, "embed": embed.main, "train": train.main}[kind]  # what each -m runs
    monkeypatch.chdir(ROOT)
    capsys.readouterr()  # only this command's output
    try:
        code = main(cli_args(kind, model, inputs, tmp_path))
    except SystemExit as err:  # argparse
        code = err.code
    return code, capsys.readouterr().err


# Runs a command as its own grandchild and prints the command's peak memory. Linux counts in a process's
# ru_maxrss the memory of the process it was forked from (fork copies the parent's high-water mark): forked from
# this small launcher, the command is measured from a ~10 MB floor instead of pytest's few hundred MB.
LAUNCHER = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execv(sys.argv[1], sys.argv[1:])\n"
            "_, status, usage = os.wait4(pid, 0)\nsys.stderr.write(f'\\nPEAK_RSS_KB {usage.ru_maxrss}\\n')\n"
            "sys.exit(os.waitstatus_to_exitcode(status))")


def run_measured(cmd: list[str], tmp_path: Path, timeout: float = 600) -> tuple[int, str, int]:
    """(exit code, stderr, peak resident memory in bytes) of a real process (``LAUNCHER``)."""
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)
    err, _, peak = proc.stderr.rpartition("\nPEAK_RSS_KB ")
    return proc.returncode, err, int(peak) * 1024


def assert_one_line(code: int, err: str, prog: str, path: Path, expect: str) -> str:
    import re
    lines = [ln for ln in err.splitlines() if ln.strip() and "WARNING" not in ln and "Warning" not in ln
             and not ln.startswith("  ")]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: {path}"), err[-3000:]
    assert re.search(expect, lines[0]), lines[0]
    return lines[0]


# One model file per kind of problem through the three commands; every variant of MODEL_FILES goes through the
# same checker above. In this process, but the memory bomb: its peak memory is measured in a real process.
CLI_FILES = ["int8", "nan", "wrong shape", "shared storage"]


@pytest.mark.parametrize("name", CLI_FILES)
def test_eval_embed_and_init_backbone_print_one_line_for_each_bad_model(tmp_path, inputs, name, capsys, monkeypatch):
    path = model_file(tmp_path, name)
    expect = MODEL_FILES[name][1]
    for kind, prog in PROGS.items():
        code, err = run_in_process(kind, path, inputs, tmp_path, capsys, monkeypatch)
        line = assert_one_line(code, err, prog, path, expect)
        print(f"{kind} {name}: {line}")
    assert not list(tmp_path.glob("e_*.npy")) and not (tmp_path / "run" / "checkpoints").exists()


def test_eval_embed_and_init_backbone_refuse_an_expanded_12_gb_layer_in_bounded_memory(tmp_path, inputs):
    name = "expanded 12.5 GB"
    path = model_file(tmp_path, name)
    peaks = {}
    for kind, prog in PROGS.items():
        code, err, peak = run_measured(cli(kind, path, inputs, tmp_path), tmp_path)
        line = assert_one_line(code, err, prog, path, MODEL_FILES[name][1])
        print(f"{kind} {name}: {line} (peak {peak / MB:.0f} MiB)")
        peaks[kind] = peak
    assert not list(tmp_path.glob("e_*.npy")) and not (tmp_path / "run" / "checkpoints").exists()
    # eval infers the embedding from fc.weight's rows: 1,000,000 x 3136 floats
    assert max(peaks.values()) < 1024 * MB, peaks


def test_the_cli_still_runs_on_a_good_model(tmp_path, inputs, capsys, monkeypatch):
    path = tmp_path / "ok.pt"
    torch.save(real_state(), path)
    for kind in ("eval", "embed"):
        code, err = run_in_process(kind, path, inputs, tmp_path, capsys, monkeypatch)
        assert code == 0, err[-3000:]
    assert np.load(tmp_path / "e_ok.npy").shape == (1, EMB)


# -- memory bombs: peak memory measured ------------------------------------------------------------------

def test_a_zip_bomb_is_refused_from_the_directory_with_memory_bounded(tmp_path, inputs):
    """1 MB of archive that inflates to 1 GiB: torch itself inflates it; every ds_face reader refuses it from the
    zip directory, at the peak memory of a run on a good model."""
    bomb = zip_bomb(tmp_path / "bomb.pt", 1024 * MB)
    assert bomb.stat().st_size < 2 * MB
    code, err, peak_torch = run_measured([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], "
                                          "weights_only=True)", str(bomb)], tmp_path)
    assert code == 0 and peak_torch > 1024 * MB, (peak_torch, err[-2000:])  # the bomb is real
    good = tmp_path / "ok.pt"
    torch.save(real_state(), good)
    for kind, prog in PROGS.items():
        _, _, baseline = run_measured(cli(kind, good, inputs, tmp_path), tmp_path)
        code, err, peak = run_measured(cli(kind, bomb, inputs, tmp_path), tmp_path)
        assert_one_line(code, err, prog, bomb, r"entry 'archive/data/0' is compressed \(method 8, 1073741824 bytes "
                                               r"declared from \d+\); .*refused before inflating anything")
        print(f"zip bomb, {kind}: peak {peak / MB:.0f} MiB (a good model: {baseline / MB:.0f} MiB; "
              f"torch.load itself: {peak_torch / MB:.0f} MiB)")
        assert peak < baseline + 64 * MB, (kind, peak, baseline)
    with pytest.raises(UnsafeFileError, match="is compressed"):
        load_weights_only(bomb, mmap=False)
    assert named_globals(bomb) == []  # it reads no entry of a refused archive


def test_a_legacy_file_declaring_a_huge_storage_is_refused_before_allocating(tmp_path):
    legacy_file(tmp_path / "ok.pt", 4)
    assert load_weights_only(tmp_path / "ok.pt")["w"].shape == (4,)
    path = legacy_file(tmp_path / "huge.pt", 10**10)  # 40 GB declared, 16 bytes stored
    code, err, peak = run_measured([sys.executable, "-c", "import sys\nfrom ds_face.checkpoint.safe_load import "
                                    "load_weights_only\ntry:\n    load_weights_only(sys.argv[1])\nexcept ValueError "
                                    "as e:\n    sys.exit(str(e))", str(path)], tmp_path)
    assert code == 1 and f"{path}: its storages declare 40000000000 bytes, more than the file's" in err, err
    print(f"legacy file declaring 40 GB: peak {peak / MB:.0f} MiB")
    assert peak < 1024 * MB


# -- crafted files: what torch.save cannot write ---------------------------------------------------------

def _patch(path: Path, old: bytes, new: bytes, index: int = 0) -> None:
    data = bytearray(path.read_bytes())
    at = -1
    for _ in range(index + 1):
        at = data.index(old, at + 1)
    data[at:at + len(new)] = new
    path.write_bytes(bytes(data))


def _ok_zip(path):
    return torch_zip(path, {"w": Tensor(Storage("0", 4), 0, (4,), (1,))}, {"0": bytes(16)})


def _header_method(path):  # the local header of data/0 says deflated, the directory says stored
    _ok_zip(path)
    data = bytearray(path.read_bytes())
    at = data.index(b"archive/data/0") - 30
    data[at + 8:at + 10] = struct.pack("<H", 8)
    path.write_bytes(bytes(data))


def _header_name(path):  # the local header names another entry than the directory
    _ok_zip(path)
    _patch(path, b"archive/data/0", b"archive/data/1")


def _overlap(path):  # directory and local header both say data/0 holds 64 bytes: it runs over the next entry
    _ok_zip(path)
    data = bytearray(path.read_bytes())
    at = data.find(b"archive/data/0")
    while at != -1:
        if data[at - 46:at - 42] == b"PK\x01\x02":  # central directory record: sizes at 20
            data[at - 46 + 20:at - 46 + 28] = struct.pack("<II", 64, 64)
        elif data[at - 30:at - 26] == b"PK\x03\x04":  # local header: sizes at 18
            data[at - 30 + 18:at - 30 + 26] = struct.pack("<II", 64, 64)
        at = data.find(b"archive/data/0", at + 1)
    path.write_bytes(bytes(data))


def _duplicate(path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it writes
        torch_zip(path, {"w": Tensor(Storage("0", 4), 0, (4,), (1,))}, {"0": bytes(16), "x": bytes(16)},
                  names={"x": "archive/data/0"})


def _tar(path):
    with tarfile.open(path, "w") as tar:
        for name in ("storages", "tensors", "pickle"):
            info = tarfile.TarInfo(name)
            info.size = 8
            tar.addfile(info, io.BytesIO(struct.pack("<q", 10**12)))


CRAFTED = {
    "negative stride": (lambda p: torch_zip(p, {"w": Tensor(Storage("0", 4), 0, (4,), (-1,))}, {"0": bytes(16)}),
                        r"refused to load: a tensor of storage '0' has a negative size, stride or offset \(size \[4\], "
                        r"stride \[-1\], offset 0\)"),
    "storage smaller than its tensor": (
        lambda p: torch_zip(p, {"w": Tensor(Storage("0", 4), 0, (8,), (1,))}, {"0": bytes(16)}),
        r"refused to load: a tensor of shape \[8\] \(strides \[1\], offset 0\) reaches byte 32 of storage '0', "
        r"which holds 16"),
    "huge shape, tiny storage": (
        lambda p: torch_zip(p, {"w": Tensor(Storage("0", 4), 0, (100_000, 100_000), (100_000, 1))}, {"0": bytes(16)}),
        r"a tensor of shape \[100000, 100000\] \(strides \[100000, 1\], offset 0\) reaches byte 40000000000 of "
        r"storage '0', which holds 16"),
    "stride 0, huge shape": (
        lambda p: torch_zip(p, {"w": Tensor(Storage("0", 4), 0, (100_000, 100_000), (0, 0))}, {"0": bytes(16)}),
        r"w is an expanded or overlapping view \(shape \[100000, 100000\], strides \[0, 0\]"),
    "offset past the storage": (
        lambda p: torch_zip(p, {"w": Tensor(Storage("0", 4), 3, (4,), (1,))}, {"0": bytes(16)}),
        r"a tensor of shape \[4\] \(strides \[1\], offset 3\) reaches byte 28 of storage '0', which holds 16"),
    "storage declared larger than its entry": (
        lambda p: torch_zip(p, {"w": Tensor(Storage("0", 10**10), 0, (4,), (1,))}, {"0": bytes(16)}),
        r"storage '0' declares 40000000000 bytes, but the archive holds 16 bytes for it"),
    "storage without an entry": (
        lambda p: torch_zip(p, {"w": Tensor(Storage("7", 4), 0, (4,), (1,))}, {"0": bytes(16)}),
        r"storage '7' declares 16 bytes, but the archive holds no such entry"),
    "bytearray(10**10)": (lambda p: torch_zip(p, {"w": Call(bytearray, 10**10)}, {}),
                          r"refused to load: it names the global builtins\.bytearray"),
    "deflated pickle": (lambda p: torch_zip(p, {"w": 1}, {}, names={}) and _recompress(p),
                        r"entry 'archive/data\.pkl' is compressed \(method 8"),
    "duplicate entry names": (_duplicate, r"entry 'archive/data/0' appears twice in the archive"),
    "local header: another method": (_header_method, r"entry 'archive/data/0': its local header disagrees"),
    "local header: another name": (_header_name, r"entry 'archive/data/0': its local header disagrees"),
    "overlapping entries": (_overlap, r"entries 'archive/data/0' and 'archive/version' overlap in the file"),
    "entry outside the archive folder": (
        lambda p: torch_zip(p, {"w": 1}, {"0": bytes(16)}, names={"0": "elsewhere/data/0"}),
        r"entry 'elsewhere/data/0' lies outside the archive folder 'archive'"),
    "torch's old tar format": (_tar, r"refused to load: torch's tar format \(before torch 1\.0\)"),
    "a pickle that is not torch's": (lambda p: p.write_bytes(pickle.dumps({"w": 1}, protocol=2)),
                                     r"not a readable torch file"),
    "persistent id of another kind": (
        lambda p: torch_zip(p, {"w": Tensor(Storage("0", 4, kind=torch.QInt8Storage), 0, (4,), (1,))},
                            {"0": bytes(4)}),
        r"refused to load: it names the global torch\.QInt8Storage"),
}


def _recompress(path):
    with zipfile.ZipFile(path) as z:
        entries = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in entries:
            info.compress_type = zipfile.ZIP_DEFLATED if info.filename.endswith("data.pkl") else zipfile.ZIP_STORED
            z.writestr(info, data)
    return path


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_files_are_refused_naming_the_file(tmp_path, name):
    make, expect = CRAFTED[name]
    path = tmp_path / "model.pt"
    make(path)
    for mmap in (False, True):
        with pytest.raises(UnsafeFileError, match=expect) as err:
            load_weights_only(path, mmap=mmap)
        assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    with pytest.raises(BackboneFileError, match=expect):
        load_backbone_file(path, get_backbone("r_tiny", EMB), "r_tiny")


def test_the_crafting_writes_what_torch_reads(tmp_path):
    """The hand-written format is torch's: an intact crafted file loads in torch and in ds_face alike."""
    path = torch_zip(tmp_path / "ok.pt", {"w": Tensor(Storage("0", 4), 0, (2, 2), (2, 1))},
                     {"0": struct.pack("<4f", 1, 2, 3, 4)})
    expected = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(torch.load(path, weights_only=True)["w"], expected)
    assert torch.equal(load_weights_only(path, mmap=True)["w"], expected)
    assert "torch._utils._rebuild_tensor_v2" in named_globals(path)
