"""Export (`python -m ds_face.export`) and `--init-backbone`, on real checkpoints.

The checkpoints come from the real DeepSpeed engine (``ds_face.training.trainer.Trainer``) on 1 and 2
gloo ranks, trained for two optimizer steps and saved by the trainer's own checkpointer.
"""
from __future__ import annotations

import functools
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from ds_face.export import cli as export

from ds_face.export import weights as export_weights
from ds_face.backbones import get_backbone
from ds_face.config import ModelConfig
from ds_face.training.init_backbone import BackboneFileError, check_backbone_file, load_backbone_file
from ds_face.runtime.spawn import run_ranks
from tests import conftest

ROOT = Path(__file__).resolve().parents[1]
CLASSES, EMBEDDING, TAG = 11, 32, "step_1"
make_trainer = functools.partial(conftest.make_trainer, classes=CLASSES, embedding=EMBEDDING, micro=4)
ONE_RANK = [(0, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16")]
TWO_RANKS = [(0, "fp32"), (2, "fp32")]


def _checkpoint_worker(rank, world_size, root, cases):
    import deepspeed

    out = {}
    for stage, precision in cases:
        trainer = make_trainer(world_size, Path(root) / f"w{world_size}_z{stage}_{precision}", stage, precision)
        trainer.cfg.schedule.max_steps = 1
        trainer.fit()  # one optimizer step, then the trainer's own save: step_1
        torch.distributed.barrier()
        with deepspeed.zero.GatheredParameters(list(trainer.engine.module.parameters()), enabled=stage == 3):
            module = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
        result = {"module": module, "head": trainer.head.weight.clone()}
        if precision != "fp32":  # stage 0, 16-bit: the optimizer's fp32 master copies, in parameter order
            names = [n for n, p in trainer.engine.module.named_parameters() if p.requires_grad]
            masters = [t for group in trainer.engine.optimizer.fp32_groups for t in group]
            result["masters"] = {n: t.detach().clone() for n, t in zip(names, masters, strict=True)}
        out[f"z{stage}_{precision}"] = result
        del trainer
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{(world_size, "z<stage>_<precision>"): (save_dir, what the engine held when it saved, per rank)}."""
    root = tmp_path_factory.mktemp("ckpts")
    found = {}
    for world_size, cases in ((1, ONE_RANK), (2, TWO_RANKS)):
        per_rank = run_ranks(world_size, _checkpoint_worker, str(root), cases)
        for stage, precision in cases:
            key = f"z{stage}_{precision}"
            found[world_size, key] = (root / f"w{world_size}_{key}" / "checkpoints", [r[key] for r in per_rank])
    return found


def run_export(*args):
    """``python -m ds_face.export ...`` in-process: (exit code, stdout, stderr)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = export.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def last_line(text: str) -> str:
    """The error line; DeepSpeed's converter prints its progress to stderr before it."""
    return text.strip().splitlines()[-1]


# -- model.pt ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size,case", [(1, "z0_fp32"), (1, "z2_fp32"), (1, "z3_fp32"), (1, "z0_bf16"),
                                             (2, "z0_fp32"), (2, "z2_fp32")])
def test_model_pt_is_the_engines_fp32_backbone_with_arcface_keys(ckpts, tmp_path, world_size, case):
    save_dir, engine = ckpts[world_size, case]
    # save_dir (tag from 'latest') for some, the tag directory itself for the others
    source = save_dir if case.startswith("z2") or world_size == 1 else save_dir / TAG
    code, out, err = run_export(source, "--out", tmp_path / "model.pt")
    assert code == 0, err
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert type(state) is dict
    fresh = get_backbone("r_tiny", EMBEDDING).state_dict()
    assert list(state) == list(fresh), "exactly arcface_torch's keys, in its order"
    for name, value in state.items():
        assert value.dtype == (torch.float32 if fresh[name].is_floating_point() else fresh[name].dtype), name
        assert value.shape == fresh[name].shape, name
    module = engine[0]["module"]
    if case.endswith("fp32"):
        for name, value in state.items():
            assert torch.equal(value, module[name]), name  # exact: no cast, no rounding
    else:  # bf16: the fp32 masters, which round to the module's 16-bit weights but are not them
        masters = engine[0]["masters"]
        for name, value in state.items():
            if name in masters:
                assert torch.equal(value, masters[name]), name
            assert torch.equal(value.to(module[name].dtype), module[name]), name
        assert any(not torch.equal(state[n], module[n].float()) for n in masters), "16-bit weights were exported"
    assert not any(k.startswith("module.") for k in state)
    # every rank held the same weights (BatchNorm running statistics are per rank; rank 0's are saved)
    params = dict(get_backbone("r_tiny", EMBEDDING).named_parameters())
    for other in engine[1:]:
        for name in params:
            assert torch.equal(other["module"][name], module[name]), name
    get_backbone("r_tiny", EMBEDDING).load_state_dict(state, strict=True)
    assert "step_1" in out and f"ZeRO stage {case[1]}" in out


def test_onnx_matches_torch_with_a_dynamic_batch(ckpts, tmp_path):
    onnx = pytest.importorskip("onnx", reason="pip install \"ds_face[onnx]\" (make setup does)")
    pytest.importorskip("onnxruntime", reason="pip install \"ds_face[onnx]\" (make setup does)")
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript (the onnx extra)")
    save_dir, _ = ckpts[2, "z2_fp32"]
    code, out, err = run_export(save_dir, "--out", tmp_path / "model.pt", "--onnx", tmp_path / "model.onnx")
    assert code == 0, err
    diffs = {int(b): float(d) for b, d in re.findall(r"batch (\d+): ([0-9.e+-]+)", out)}
    print(f"ONNX parity (max abs diff, onnxruntime vs torch): {diffs}")
    assert set(diffs) == {4, 3} and max(diffs.values()) < 1e-4
    model = onnx.load(tmp_path / "model.onnx")
    (graph_input,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert graph_input.name == "input" and isinstance(dims[0], str) and dims[1:] == [3, 112, 112]
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*tmp*")), "no temporary files left"


def test_a_failed_onnx_check_writes_nothing(ckpts, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    save_dir, _ = ckpts[1, "z2_fp32"]
    code, _, err = run_export(save_dir, "--out", tmp_path / "model.pt", "--onnx", tmp_path / "m.onnx", "--atol", "0")
    if code == 0:
        pytest.skip("onnxruntime matched torch bit for bit; nothing to fail")
    assert code == 1 and "ONNX check failed" in err
    assert list(tmp_path.iterdir()) == []


# -- the head ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [1, 2])
def test_head_is_the_rank_slices_in_class_order(ckpts, tmp_path, world_size):
    save_dir, engine = ckpts[world_size, "z2_fp32"]
    code, out, err = run_export(save_dir, "--out", tmp_path / "model.pt", "--head", tmp_path / "head.pt")
    assert code == 0, err
    head = torch.load(tmp_path / "head.pt", weights_only=True)
    assert list(head) == ["weight"] and head["weight"].shape == (CLASSES, EMBEDDING)
    assert torch.equal(head["weight"], torch.cat([r["head"] for r in engine]))


def _copy(save_dir, tmp_path) -> Path:
    return Path(shutil.copytree(save_dir, tmp_path / "checkpoints"))


def _edit_shard(path, **changes):
    """Change the head's slice in one rank's file (and the rows every sharded part says it holds)."""
    file = torch.load(path, weights_only=True)
    file["sharded"]["head"].update(changes)
    for part in file["sharded"].values():
        part.update({k: v for k, v in changes.items() if k in ("class_start", "num_local")})
    torch.save(file, path)


@pytest.mark.parametrize("damage,expect", [
    ("missing", r"missing head_rank1_of2\.pt"),
    ("overlap", r"head_rank1_of2\.pt: head slice starts at class 5, expected 6: an overlap after head_rank0_of2\.pt"),
    ("short", r"end at class 10 \(head_rank1_of2\.pt\)"),
    ("stale", r"different world sizes \[2, 3\]: .*head_rank0_of3\.pt"),
])
def test_a_head_that_does_not_tile_the_classes_fails_naming_the_files(ckpts, tmp_path, damage, expect):
    save_dir = _copy(ckpts[2, "z2_fp32"][0], tmp_path)
    tag_dir = save_dir / TAG
    if damage == "missing":
        (tag_dir / "head_rank1_of2.pt").unlink()
    elif damage == "overlap":  # rank 0 owns classes 0..5; rank 1 (6..10) also claims 5
        shard = torch.load(tag_dir / "head_rank1_of2.pt", weights_only=True)["sharded"]["head"]
        _edit_shard(tag_dir / "head_rank1_of2.pt", class_start=5, num_local=6,
                    weight=torch.cat([shard["weight"][:1], shard["weight"]]))
    elif damage == "short":
        shard = torch.load(tag_dir / "head_rank1_of2.pt", weights_only=True)["sharded"]["head"]
        _edit_shard(tag_dir / "head_rank1_of2.pt", num_local=4, weight=shard["weight"][:4])
    else:  # a shard left over from a 3-rank save in the same directory
        shutil.copy(tag_dir / "head_rank0_of2.pt", tag_dir / "head_rank0_of3.pt")
    (tmp_path / "model.pt").write_bytes(b"keep me")
    code, out, err = run_export(save_dir, "--out", tmp_path / "model.pt", "--head", tmp_path / "head.pt",
                                "--overwrite")
    assert code == 2 and last_line(err).startswith("ds_face.export: error: "), err
    assert re.search(expect, last_line(err)), err
    assert (tmp_path / "model.pt").read_bytes() == b"keep me" and not (tmp_path / "head.pt").exists()


# -- bad input --------------------------------------------------------------------------------------

def _garble(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as by a full disk


BAD = {
    "not a checkpoint": (lambda d: Path(tempfile.mkdtemp()), r"is not a checkpoint directory: no latest file"),
    "no such dir": (lambda d: d / "nope", r"checkpoints/nope: no such directory"),
    "missing latest": (lambda d: (d / "latest").unlink() or d, r"checkpoints/latest is missing; pass --tag "
                                                               r"\(tags in .*: step_1\)"),
    "latest names a missing tag": (lambda d: (d / "latest").write_text("step_9") and d,
                                   r"checkpoints/latest names tag 'step_9', but .*checkpoints/step_9 does not exist"),
    "missing model states": (lambda d: (d / TAG / export_weights.MODEL_STATES).unlink() or d,
                             r"step_1/mp_rank_00_model_states\.pt is missing"),
    "corrupt model states": (lambda d: _garble(d / TAG / export_weights.MODEL_STATES) or d,
                             r"step_1/mp_rank_00_model_states\.pt: not a readable torch file"),
    "corrupt optimizer shard": (lambda d: _garble(next((d / TAG).glob("*optim_states.pt"))) or d,
                                r"step_1/zero_pp_rank_0_mp_rank_00_optim_states\.pt: not a readable torch file"),
    "missing meta": (lambda d: (d / TAG / "ds_face_meta.json").unlink() or d, r"step_1/ds_face_meta\.json: not found; .* is not a complete ds_face checkpoint"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_clear_error_and_overwrites_nothing(ckpts, tmp_path, name):
    damage, expect = BAD[name]
    source = damage(_copy(ckpts[1, "z2_fp32"][0], tmp_path))
    (tmp_path / "model.pt").write_bytes(b"keep me")
    code, out, err = run_export(source, "--out", tmp_path / "model.pt", "--overwrite")
    assert code == 2, (out, err)
    assert last_line(err).startswith("ds_face.export: error: ") and "Traceback" not in err, err
    assert re.search(expect, last_line(err)), err
    assert (tmp_path / "model.pt").read_bytes() == b"keep me"


def test_unknown_tag_lists_the_tags(ckpts, tmp_path):
    code, _, err = run_export(ckpts[1, "z2_fp32"][0], "--tag", "step_9", "--out", tmp_path / "model.pt")
    assert code == 2 and re.search(r"tag 'step_9' not found: .*step_9 \(tags in .*: step_1\)", err), err
    code, _, err = run_export(ckpts[1, "z2_fp32"][0], "--tag", TAG, "--out", tmp_path / "model.pt")
    assert code == 0, err


def test_existing_output_needs_overwrite(ckpts, tmp_path):
    save_dir, engine = ckpts[1, "z2_fp32"]
    (tmp_path / "model.pt").write_bytes(b"keep me")
    code, _, err = run_export(save_dir, "--out", tmp_path / "model.pt")
    assert code == 2 and "model.pt exists; pass --overwrite" in err
    assert (tmp_path / "model.pt").read_bytes() == b"keep me"
    code, _, err = run_export(save_dir, "--out", tmp_path / "model.pt", "--overwrite")
    assert code == 0, err
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["fc.weight"],
                       engine[0]["module"]["fc.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"], "no temporary files left behind"


# -- --init-backbone --------------------------------------------------------------------------------

def _init_worker(rank, world_size, model_pt):
    trainer = make_trainer(world_size, stage=2, init_backbone=model_pt)
    return {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}


def test_a_run_started_from_an_exported_model_pt_has_its_weights_at_step_0(ckpts, tmp_path):
    save_dir, engine = ckpts[2, "z2_fp32"]
    assert run_export(save_dir, "--out", tmp_path / "model.pt")[0] == 0
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    # train.main's check (meta device), then a real start through Trainer
    check_backbone_file(tmp_path / "model.pt", ModelConfig(backbone="r_tiny", embedding_size=EMBEDDING))
    started = run_ranks(1, _init_worker, str(tmp_path / "model.pt"))[0]
    assert list(started) == list(exported)
    for name, value in exported.items():
        assert torch.equal(started[name], value), name
    assert not torch.equal(started["fc.weight"], get_backbone("r_tiny", EMBEDDING).state_dict()["fc.weight"])


def _model_pt(tmp_path, state, name="model.pt"):
    torch.save(state, tmp_path / name)
    return tmp_path / name


def test_init_backbone_accepts_ddp_and_wrapped_files(tmp_path):
    torch.manual_seed(1)
    state = get_backbone("r_tiny", EMBEDDING).state_dict()
    for i, obj in enumerate([{f"module.{k}": v for k, v in state.items()}, {"state_dict": state},
                             {"model": state, "epoch": torch.tensor(3)},
                             {"state_dict_backbone": state, "epoch": 3, "global_step": 10}]):  # arcface_torch resume
        model = load_backbone_file(_model_pt(tmp_path, obj, f"m{i}.pt"), get_backbone("r_tiny", EMBEDDING))
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("damage,expect", [
    ("wrong key", r"1 missing keys: fc\.weight; 1 unexpected keys: fc\.weights"),
    ("wrong shape", r"shape mismatches: conv1\.weight: file \[8, 3, 5, 5\] vs model \[8, 3, 3, 3\]"),
    ("wrong embedding", r"embedding size 64 \(fc\.weight is \[64, 3136\]\), but the run config has "
                        r"model\.embedding_size=32 for backbone 'r_tiny'"),
    ("other backbone", r"does not fit backbone 'r_tiny', embedding 32: 72 unexpected keys: layer1\.1\.bn1\.weight.*"
                       r"96 shape mismatches: conv1\.weight: file \[64, 3, 3, 3\] vs model \[8, 3, 3, 3\].*"
                       r"The file has layers \[2, 2, 2, 2\], .* \(looks like r18\)"),
    ("not torch", r"not a readable torch file"),
    ("deepspeed file", r"is a DeepSpeed checkpoint file, not a model\.pt; export it first"),
    ("no file", r"no such file"),
])
def test_a_model_pt_that_does_not_fit_is_a_clear_error(tmp_path, damage, expect):
    state = get_backbone("r_tiny", EMBEDDING).state_dict()
    if damage == "wrong key":
        state["fc.weights"] = state.pop("fc.weight")
    elif damage == "wrong shape":
        state["conv1.weight"] = torch.zeros(8, 3, 5, 5)
    elif damage == "wrong embedding":
        state = get_backbone("r_tiny", 64).state_dict()
    elif damage == "other backbone":
        with torch.device("meta"):
            shapes = {k: (v.shape, v.dtype) for k, v in get_backbone("r18", 8).state_dict().items()}
        state = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}
    path = _model_pt(tmp_path, state)
    if damage == "not torch":
        path.write_bytes(b"not a torch file")
    elif damage == "deepspeed file":
        torch.save({"module": state, "buffer_names": [], "ds_version": "0.19.8"}, path)
    elif damage == "no file":
        path.unlink()
    with pytest.raises(BackboneFileError, match=expect) as info:
        load_backbone_file(path, get_backbone("r_tiny", EMBEDDING), "r_tiny")
    assert str(path) in str(info.value)


def test_train_checks_init_backbone_before_any_process_group(tmp_path, capsys):
    from ds_face.train import main
    args = ["--config", str(ROOT / "configs/cpu_demo.yaml"), "--deepspeed_config",
            str(ROOT / "ds_configs/cpu_zero2_fp32.json"), "--set", f"output.dir={tmp_path / 'run'}"]
    assert main(args + ["--init-backbone", str(tmp_path / "missing.pt")]) == 2
    assert f"ds_face.train: error: {tmp_path / 'missing.pt'}: no such file" in capsys.readouterr().err
    wrong = _model_pt(tmp_path, get_backbone("r_tiny", EMBEDDING).state_dict())  # cpu_demo has embedding 128
    assert main(args + ["--init-backbone", str(wrong)]) == 2
    assert "model.embedding_size=128" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


# -- outputs that cannot be written, and weights that must not be exported ----------------------------------

def export_process(*args):
    """``python -m ds_face.export ...`` as a real process."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "ds_face.export", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nothing can be written into: mode 555, and immutable (chattr +i) where we are root."""
    import os
    import subprocess
    path = tmp_path / "ro"
    path.mkdir()
    path.chmod(0o555)
    immutable = False
    if os.access(path, os.W_OK):  # root ignores the mode
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
        if not immutable:
            path.chmod(0o755)
            pytest.skip("root here, and chattr +i is not available: no read-only directory to test with")
    yield path
    if immutable:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o755)


def test_export_into_a_read_only_directory_is_one_line_and_writes_nothing(ckpts, tmp_path, read_only_dir):
    save_dir, _ = ckpts[1, "z2_fp32"]
    ro = read_only_dir
    for args, where, expect in (
            (["--out", ro / "model.pt"], ro / "model.pt", f"the directory {ro} is not writable"),
            (["--out", tmp_path / "model.pt", "--head", ro / "head.pt"], ro / "head.pt", "is not writable"),
            (["--out", ro / "sub" / "model.pt"], ro / "sub" / "model.pt", f"cannot create its directory {ro / 'sub'}")):
        proc = export_process(save_dir, *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        line = last_line(proc.stderr)
        assert line.startswith("ds_face.export: error: --") and str(where) in line and expect in line, line
    assert list(ro.iterdir()) == [] and not (tmp_path / "model.pt").exists()  # nothing, not even the good one


def test_an_existing_output_even_a_dangling_link_is_kept(ckpts, tmp_path):
    save_dir, _ = ckpts[1, "z2_fp32"]
    link = tmp_path / "model.pt"
    link.symlink_to(tmp_path / "elsewhere.pt")
    code, _, err = run_export(save_dir, "--out", link)
    assert code == 2 and last_line(err) == f"ds_face.export: error: --out {link} exists; pass --overwrite to replace it"
    assert link.is_symlink() and not (tmp_path / "elsewhere.pt").exists()


def _damage_module(states: Path, damage: str) -> None:
    obj = torch.load(states, weights_only=False)  # our own test checkpoint
    weight = obj["module"]["conv1.weight"]
    if damage == "nan":
        weight.view(-1)[5] = float("nan")
    elif damage == "int8":
        obj["module"]["conv1.weight"] = weight.to(torch.int8)
    elif damage == "expanded":
        obj["module"]["fc.weight"] = torch.zeros(1, 1).expand(1_000_000, obj["module"]["fc.weight"].shape[1])
    torch.save(obj, states)


@pytest.mark.parametrize("damage,expect", [
    ("nan", r"conv1\.weight holds 1 non-finite value\(s\) \(first: nan\); backbone 'r_tiny' with embedding 32"),
    ("int8", r"conv1\.weight is dtype int8, expected float32, float16 or bfloat16"),
    ("expanded", r"mp_rank_00_model_states\.pt: module\.fc\.weight is an expanded or overlapping view \(shape "
                 r"\[1000000, 3136\], strides \[0, 0\]"),
])
def test_weights_that_must_not_be_exported_are_named(ckpts, tmp_path, damage, expect):
    save_dir = _copy(ckpts[1, "z0_fp32"][0], tmp_path)
    _damage_module(save_dir / TAG / export_weights.MODEL_STATES, damage)
    code, _, err = run_export(save_dir, "--out", tmp_path / "model.pt")
    assert code == 2 and last_line(err).startswith("ds_face.export: error: ") and "Traceback" not in err, err
    assert re.search(expect, last_line(err)), last_line(err)
    assert not (tmp_path / "model.pt").exists()
