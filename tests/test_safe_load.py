"""ds_face.checkpoint.safe_load: real DeepSpeed checkpoints load weights-only; real malicious files are refused, nothing runs.

The checkpoints come from the real engine (ZeRO 0-3; fp32, bf16 and fp16 — fp16 on CPU with DeepSpeed's
capability probe lifted, as tests/test_engine.py does). The malicious files are real pickles whose
``__reduce__`` would create a marker file (``os.system``, ``builtins.exec``, ``subprocess.call``); one of them
is first shown to create its marker under ``torch.load(weights_only=False)``, which is what DeepSpeed uses.
"""
from __future__ import annotations

import functools
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_face.checkpoint.safe_load import DEEPSPEED_GLOBALS, UnsafeFileError, check_checkpoint_dir, check_meta_counts, \
    load_weights_only, named_globals
from ds_face.runtime.spawn import run_ranks
from tests import conftest

ROOT = Path(__file__).resolve().parents[1]
TAG = "step_1"
# together these hold all four DeepSpeed types of DEEPSPEED_GLOBALS
CASES = [(0, "fp16"), (1, "fp16"), (2, "bf16"), (3, "fp32")]
# one optimizer step, then the trainer's own save
make_trainer = functools.partial(conftest.make_trainer, classes=5, embedding=16, micro=2, clip=1.0, max_steps=1,
                                 samples=100)


def _checkpoint_worker(rank, world_size, root):
    from deepspeed.accelerator import get_accelerator
    get_accelerator().is_fp16_supported = lambda: True  # torch runs fp16 on any CPU; DeepSpeed's probe says no

    for stage, precision in CASES:
        trainer = make_trainer(world_size, Path(root) / f"z{stage}_{precision}", stage, precision)
        trainer.fit()  # one step, then the trainer's own save: step_1
        torch.distributed.barrier()
        del trainer
    return 0


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_ckpts")
    run_ranks(2, _checkpoint_worker, str(root))
    return {f"z{s}_{p}": root / f"z{s}_{p}" / "checkpoints" for s, p in CASES}


# -- the malicious files ----------------------------------------------------------------------------------

class System:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Exec(System):
    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class Subprocess(System):
    def __reduce__(self):
        return subprocess.call, (["touch", self.marker],)


PAYLOADS = {"os.system": (System, "posix.system"), "builtins.exec": (Exec, "builtins.exec"),
            "subprocess.call": (Subprocess, "subprocess.call")}


def write_malicious(path: Path, payload: str, marker: Path, protocol: int = 2, raw: bool = False) -> str:
    """A file that runs ``payload`` when unpickled; returns the global a refusal must name."""
    cls, name = PAYLOADS[payload]
    if raw:  # a bare pickle, not torch's zip format
        path.write_bytes(pickle.dumps({"module": {"w": 1}, "x": cls(marker)}, protocol=protocol))
    else:  # torch's zip format, tensors included, the payload beside them
        torch.save({"module": {"w": torch.ones(3)}, "x": cls(marker)}, path, pickle_protocol=protocol)
    return name


def test_the_malicious_files_are_real(tmp_path):
    """Unpickled as DeepSpeed does (weights_only=False), each payload really runs."""
    for payload in PAYLOADS:
        marker = tmp_path / f"ran_{payload}"
        path = tmp_path / "evil.pt"
        write_malicious(path, payload, marker)
        subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"],
                       check=True, capture_output=True)
        assert marker.exists(), payload


# -- real DeepSpeed files load -------------------------------------------------------------------------

def test_real_deepspeed_checkpoints_load_weights_only(ckpts):
    seen = set()
    for name, save_dir in ckpts.items():
        files = check_checkpoint_dir(save_dir / TAG)
        assert any(f.name.endswith("model_states.pt") for f in files), name
        for path in files:
            load_weights_only(path)  # and without mmap
            seen |= {g for g in named_globals(path) if g.startswith("deepspeed.")}
    assert seen == set(DEEPSPEED_GLOBALS)  # every allowed type is needed, and no other one


def test_a_legacy_non_zip_torch_file_loads(tmp_path):
    torch.save({"w": torch.arange(3)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_weights_only(tmp_path / "old.pt", mmap=True)["w"], torch.arange(3))


# -- malicious files are refused by every reader -----------------------------------------------------------

DS_NAMES = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("name", DS_NAMES)
def test_resume_precheck_refuses_a_malicious_deepspeed_file(ckpts, tmp_path, payload, protocol, name):
    tag_dir = Path(shutil.copytree(ckpts["z2_bf16"] / TAG, tmp_path / TAG))
    target = tag_dir / (f"bf16_{name}" if "optim" in name else name)
    marker = tmp_path / "pwned"
    refused = write_malicious(target, payload, marker, protocol)
    with pytest.raises(UnsafeFileError) as err:
        check_checkpoint_dir(tag_dir)
    assert str(target) in str(err.value) and f"the global {refused}" in str(err.value)
    assert err.value.refused == refused and not marker.exists()


def _resume(rank, world_size, out_dir):
    from deepspeed.accelerator import get_accelerator
    get_accelerator().is_fp16_supported = lambda: True

    from ds_face.checkpoint.files import CheckpointError
    trainer = make_trainer(world_size, out_dir, 2, "bf16")
    try:
        trainer.resume()
    except CheckpointError as err:
        return str(err)
    return None


@pytest.mark.parametrize("name", ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "head_rank0_of2.pt",
                                  "backbone_full.pt"])
def test_a_real_resume_refuses_a_malicious_file_on_every_rank(ckpts, tmp_path, name):
    out = tmp_path / "run"
    shutil.copytree(ckpts["z2_bf16"], out / "checkpoints")
    target = out / "checkpoints" / TAG / (f"bf16_{name}" if "optim" in name else name)
    assert target.is_file()
    marker = tmp_path / "pwned"
    refused = write_malicious(target, "os.system", marker)
    errors = run_ranks(2, _resume, str(out))
    assert all(e and str(target) in e and f"the global {refused}" in e for e in errors), errors
    assert not marker.exists()


def run_export(*args) -> subprocess.CompletedProcess:
    """``python -m ds_face.export ...`` as its ``main(argv)`` in this process, from the checkout: a payload that
    ran would leave its marker file here as in a fresh process (os.system and subprocess.call start a shell)."""
    import contextlib
    import io
    from ds_face.export import cli as export
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = export.main(argv)
    return subprocess.CompletedProcess(["ds_face.export", *argv], code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("case,name", [("z2_bf16", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                                       ("z1_fp16", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                       ("z3_fp32", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                                       ("z0_fp16", "mp_rank_00_model_states.pt"),
                                       ("z0_fp16", "head_rank1_of2.pt")])
@pytest.mark.parametrize("payload", ["os.system", "subprocess.call"])
def test_export_refuses_a_malicious_file_before_zero_to_fp32(ckpts, tmp_path, case, name, payload):
    save_dir = Path(shutil.copytree(ckpts[case], tmp_path / "ckpt"))
    marker = tmp_path / "pwned"
    refused = write_malicious(save_dir / TAG / name, payload, marker, protocol=4)
    proc = run_export(save_dir / TAG, "--out", tmp_path / "model.pt", "--head", tmp_path / "head.pt")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ds_face.export: error: ") and "Traceback" not in proc.stderr
    assert f"{save_dir / TAG / name}: refused to load: it names the global {refused}" in last
    assert not marker.exists() and not (tmp_path / "model.pt").exists()


def test_export_still_works_on_the_real_files(ckpts, tmp_path):
    for case in ("z1_fp16", "z3_fp32"):
        proc = run_export(ckpts[case], "--out", tmp_path / f"{case}.pt")
        assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("raw", [False, True])
def test_model_pt_is_refused_by_init_backbone_eval_and_embed(tmp_path, payload, raw, capsys, monkeypatch):
    """eval and embed as their ``main(argv)`` in this process: a payload that ran would leave its marker here."""
    from ds_face.backbones import get_backbone
    from ds_face.eval import embed, verification
    from ds_face.training.init_backbone import BackboneFileError, load_backbone_file
    marker = tmp_path / "pwned"
    model_pt = tmp_path / "model.pt"
    refused = write_malicious(model_pt, payload, marker, protocol=2 if raw else 4, raw=raw)
    with pytest.raises(BackboneFileError, match=f"{model_pt}: refused to load: it names the global {refused}"):
        load_backbone_file(model_pt, get_backbone("r_tiny", 16), "r_tiny")
    monkeypatch.chdir(ROOT)
    for main, extra in ((verification.main, ["--bin", tmp_path / "none.bin"]),
                        (embed.main, ["--folder", tmp_path / "faces", "--out", tmp_path / "e.npy"])):
        # a valid set and a valid folder, so that only the model can fail
        (tmp_path / "none.bin").write_bytes(pickle.dumps(([bytes([i]) * 64 for i in range(20)], [True] * 10)))
        (tmp_path / "faces" / "id0").mkdir(parents=True, exist_ok=True)
        (tmp_path / "faces" / "id0" / "a.jpg").write_bytes(b"x")
        capsys.readouterr()  # only this command's output
        code = main([str(a) for a in ["--model", model_pt, "--backbone", "r_tiny", "--embedding", "16", *extra]])
        stderr = capsys.readouterr().err
        assert code == 2 and "Traceback" not in stderr, stderr[-2000:]
        assert f"{model_pt}: refused to load: it names the global {refused}" in stderr
        assert not marker.exists()


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_a_malicious_verification_bin_is_refused(tmp_path, payload):
    from ds_face.eval.verification import BinError, load_bin
    marker = tmp_path / "pwned"
    path = tmp_path / "lfw.bin"
    cls, name = PAYLOADS[payload]
    for protocol in (2, 4):
        path.write_bytes(pickle.dumps(([cls(marker), b"x"], [True]), protocol=protocol))
        with pytest.raises(BinError, match=f"{path}: refused to unpickle: it references the forbidden global"):
            load_bin(path)
        assert not marker.exists()


# -- counts read from ds_face_meta.json ------------------------------------------------------------------

@pytest.mark.parametrize("key,value,expect", [
    ("world_size", 10**10, r"'world_size' is 10000000000, but .* holds only \d+ files"),
    ("world_size", 0, r"'world_size' must be an integer >= 1, got 0"),
    ("world_size", 2.0, r"'world_size' must be an integer >= 1, got 2\.0"),
    ("num_classes", -1, r"'num_classes' must be an integer >= 1, got -1"),
    ("global_step", "7", r"'global_step' must be an integer >= 0, got '7'"),
])
def test_meta_counts_are_bounded_by_the_files(tmp_path, key, value, expect):
    meta = {"world_size": 2, "num_classes": 5, "embedding_size": 16, "global_step": 1, "epoch": 0}
    for name in ("head_rank0_of2.pt", "head_rank1_of2.pt"):
        (tmp_path / name).write_bytes(b"")
    check_meta_counts(meta, tmp_path)
    meta[key] = value
    with pytest.raises(ValueError, match=expect):
        check_meta_counts(meta, tmp_path)


def test_export_with_a_forged_world_size_fails_at_once(ckpts, tmp_path):
    import json
    save_dir = Path(shutil.copytree(ckpts["z2_bf16"], tmp_path / "ckpt"))
    meta_path = save_dir / TAG / "ds_face_meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "world_size": 10**10}))
    proc = run_export(save_dir, "--out", tmp_path / "m.pt", "--head", tmp_path / "h.pt")
    assert proc.returncode == 2
    assert "ds_face_meta.json: 'world_size' is 10000000000, but" in proc.stderr
