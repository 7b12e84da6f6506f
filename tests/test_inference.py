"""ds_face.eval.verification / ds_face.eval.embed read --backbone and --embedding from the weights when the command line gives none
(ds_face/eval/inference.py): real model.pt files of r_tiny and r18, a layout no backbone has, and explicit flags."""
import json

import numpy as np
import pytest
import torch

from ds_face.eval import embed as embed_cli
from ds_face.eval import verification as ev
from ds_face.backbones import IResNet, get_backbone
from ds_face.eval.inference import load_model, weights_architecture
from tests.conftest import write_shards
from tests.test_eval import write_bin


@pytest.fixture(scope="module")
def bin10(tmp_path_factory):
    return write_bin(tmp_path_factory.mktemp("bins") / "synth.bin", 10)


def test_eval_without_backbone_flags_runs_and_records_what_the_weights_are(tiny_model, bin10, tmp_path):
    path, _ = tiny_model
    given, inferred = tmp_path / "given.json", tmp_path / "inferred.json"
    common = ["--model", str(path), "--device", "cpu", "--bin", str(bin10), "--no-progress"]
    assert ev.main([*common, "--backbone", "r_tiny", "--embedding", "32", "--json", str(given)]) == 0
    assert ev.main([*common, "--json", str(inferred)]) == 0
    report = json.loads(inferred.read_text())
    assert (report["backbone"], report["embedding"]) == ("r_tiny", 32)
    untimed = lambda sets: {name: {k: v for k, v in r.items() if k != "seconds"} for name, r in sets.items()}  # noqa: E731
    assert untimed(report["sets"]) == untimed(json.loads(given.read_text())["sets"])


def test_embed_without_backbone_flags_equals_with_them(tiny_model, tmp_path):
    path, _ = tiny_model
    arrow = write_shards(tmp_path / "arrow", 9, 2, num_classes=3)
    outs = [tmp_path / "given.npy", tmp_path / "inferred.npy"]
    common = ["--model", str(path), "--device", "cpu", "--arrow", str(arrow), "--no-progress"]
    assert embed_cli.main([*common, "--backbone", "r_tiny", "--embedding", "32", "--out", str(outs[0])]) == 0
    assert embed_cli.main([*common, "--out", str(outs[1])]) == 0
    assert np.array_equal(np.load(outs[0]), np.load(outs[1]))


def test_a_real_r18_is_recognised_and_loads_exactly(tmp_path):
    torch.manual_seed(1)
    model = get_backbone("r18", 64)
    path = tmp_path / "r18.pt"
    torch.save({"state_dict_backbone": model.state_dict()}, path)  # arcface_torch's resume-file wrapping
    assert weights_architecture(str(path)) == ("r18", 64)
    loaded = load_model(str(path), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_weights_no_backbone_has_are_refused_naming_the_file(tmp_path, capsys, bin10):
    odd = IResNet([1, 1, 1, 2], widths=(8, 16, 32, 64), embedding_size=16)  # r_tiny's widths, one block more
    path = tmp_path / "odd.pt"
    torch.save(odd.state_dict(), path)
    assert ev.main(["--model", str(path), "--device", "cpu", "--bin", str(bin10), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (f"{path}: cannot tell the backbone from the weights (layers [1, 1, 1, 2], widths [8, 16, 32, 64], "
            f"embedding 16; known: r18, r34, r50, r100, r200, r_tiny); pass --backbone and --embedding") in err


def test_a_given_backbone_still_wins_and_a_wrong_one_is_named(tiny_model, tmp_path, capsys, bin10):
    path, _ = tiny_model
    for order in (["--backbone", "r18", "--model", str(path)], ["--model", str(path), "--backbone", "r18"]):
        assert ev.main([*order, "--device", "cpu", "--bin", str(bin10), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{path} does not fit backbone 'r18'" in err and "(looks like r_tiny)" in err


@pytest.mark.parametrize("flags,expect", [
    (["--device", "bogus"], "--device bogus: cannot put the model there (Expected one of cpu"),
    (["--device", "meta"], "--device meta: cannot put the model there (the meta device holds no data"),
    (["--device", "cpu", "--backbone", "r_tiny", "--embedding", "-3"], "--embedding must be a positive integer, got -3"),
    (["--device", "cpu", "--backbone", "r_tiny", "--embedding", "100000000"],
     "embedding size 32 (fc.weight is [32, 3136]), but the run config has model.embedding_size=100000000"),
])
def test_bad_model_arguments_are_one_line_before_any_model_is_built(tiny_model, bin10, capsys, flags, expect):
    path, _ = tiny_model
    assert ev.main(["--model", str(path), "--bin", str(bin10), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ds_face.eval: error: ") and expect in err, err


def test_eval_json_into_a_read_only_directory_is_one_line(tiny_model, bin10, capsys, tmp_path):
    import os
    import subprocess
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    immutable = os.access(ro, os.W_OK) and subprocess.run(["chattr", "+i", str(ro)]).returncode == 0
    if os.access(ro, os.W_OK):
        pytest.skip("root here, and chattr +i is not available: no read-only directory to test with")
    try:
        args = ["--model", str(tiny_model[0]), "--bin", str(bin10), "--no-progress", "--device", "cpu"]
        assert ev.main([*args, "--json", str(ro / "r.json")]) == 2
        err = capsys.readouterr().err
        assert err == f"ds_face.eval: error: --json {ro / 'r.json'}: directory {ro} is not writable (nothing was done)\n"
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(ro)], check=True)
        ro.chmod(0o755)
