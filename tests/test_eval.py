"""Verification evaluation (ds_face.eval.verification), embeddings export (ds_face.eval.embed) and the training callback.

The protocol is checked on constructed embeddings whose answer is known, and against a loop-for-loop copy of
arcface_torch's calculate_roc; the .bin path end to end against embeddings computed by hand with a real
r_tiny; hostile and broken .bin files are refused naming the file; a real 2-rank deepspeed launch evaluates.
"""
import io
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ds_face.eval import embed as embed_cli
from ds_face.eval import verification as ev
from ds_face.images import header_size
from ds_face.eval.inference import l2_normalize
from tests.conftest import encode, face

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_bin(path, pairs: int = 40, seed: int = 0, **dump):
    rng = np.random.default_rng(seed)
    bins, issame = [], []
    for p in range(pairs):
        same = p % 2 == 0
        a, b = 2 * p, (2 * p if same else 2 * p + 1)
        bins += [encode(face(a, rng)), encode(face(b, rng))]
        issame.append(same)
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, **dump)
    return path


@pytest.fixture(scope="module")
def bin40(tmp_path_factory):
    return write_bin(tmp_path_factory.mktemp("bins") / "synth.bin", 40)


# -- protocol -----------------------------------------------------------------------------------------

def pair_embeddings(cosines):
    """Rows 2p, 2p+1 are unit vectors with cosine cosines[p]."""
    out = []
    for c in cosines:
        out += [[1.0, 0.0], [c, np.sqrt(1 - c * c)]]
    return np.asarray(out)


def test_kfold_matches_sklearn_layout():
    folds = ev.kfold(23, 10)
    assert [len(t) for _, t in folds] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]  # KFold: first n % k folds one larger
    assert np.array_equal(np.concatenate([t for _, t in folds]), np.arange(23))
    for train, test in folds:
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(23))
    with pytest.raises(ValueError, match="9 pairs cannot be split into 10 folds"):
        ev.kfold(9)


def test_separable_pairs_give_accuracy_one_and_flipped_labels_cost_exactly_their_share():
    issame = np.arange(100) % 2 == 0
    emb = pair_embeddings(np.where(issame, 0.9, 0.1))  # distances 0.2 (same) and 1.8 (different)
    r = ev.verify(emb, issame)
    assert r["accuracy"] == 1.0 and r["std"] == 0.0 and r["pairs"] == 100
    assert 0.2 <= r["threshold"] <= 0.21 + 1e-9  # the first threshold above 0.2 separates the training folds
    wrong = issame.copy()
    wrong[[3, 15, 16, 57]] ^= True  # 4 labels lie: folds 0, 1 (twice) and 5 of 10 equal folds lose them
    r = ev.verify(emb, wrong)
    assert r["accuracies"] == [0.9, 0.8, 1, 1, 1, 0.9, 1, 1, 1, 1]
    assert r["accuracy"] == pytest.approx((100 - 4) / 100)
    assert r["std"] == pytest.approx(np.std([0.9, 0.8, 1, 1, 1, 0.9, 1, 1, 1, 1]))


def arcface_calculate_roc(thresholds, e1, e2, actual_issame, nrof_folds=10):
    """arcface_torch eval/verification.py calculate_roc (accuracy part), loop for loop."""
    def calculate_accuracy(threshold, dist, actual_issame):
        predict_issame = np.less(dist, threshold)
        tp = np.sum(np.logical_and(predict_issame, actual_issame))
        tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
        return float(tp + tn) / dist.size
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)
    accuracy, best_thresholds = np.zeros(nrof_folds), []
    for fold_idx, (train_set, test_set) in enumerate(ev.kfold(len(actual_issame), nrof_folds)):
        acc_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            acc_train[threshold_idx] = calculate_accuracy(threshold, dist[train_set], actual_issame[train_set])
        best = np.argmax(acc_train)
        best_thresholds.append(thresholds[best])
        accuracy[fold_idx] = calculate_accuracy(thresholds[best], dist[test_set], actual_issame[test_set])
    return accuracy, best_thresholds


def test_verify_equals_arcface_torch_reference_on_noisy_embeddings():
    rng = np.random.default_rng(1)
    issame = rng.random(203) < 0.5
    base = rng.normal(size=(203, 16))
    other = np.where(issame[:, None], base + rng.normal(0, 0.9, base.shape), rng.normal(size=base.shape))
    emb = l2_normalize(np.stack([base, other], 1).reshape(-1, 16))
    acc, thr = arcface_calculate_roc(ev.THRESHOLDS, emb[0::2], emb[1::2], issame)
    r = ev.verify(emb, issame)
    # the same grid points chosen; the report writes them rounded (0.52, not np.arange's 0.5199999999999999)
    assert r["accuracies"] == pytest.approx(acc.tolist(), abs=0) and r["thresholds"] == [round(t, 10) for t in thr]
    assert 0.6 < r["accuracy"] < 1.0


# -- the .bin path end to end ---------------------------------------------------------------------------

def by_hand(model, images_u8):
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        a, b = model(x).numpy(), model(torch.flip(x, [3])).numpy()
    xnorm = np.concatenate([np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)]).mean()
    s = a + b
    return s / np.linalg.norm(s, axis=1, keepdims=True), xnorm


def test_bin_end_to_end_equals_protocol_on_hand_computed_embeddings(tiny_model, bin40, tmp_path, capsys):
    path, model = tiny_model
    images, issame = ev.load_bin(bin40)
    assert len(images) == 80 and issame.tolist() == [p % 2 == 0 for p in range(40)]
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    emb, xnorm = by_hand(model, pixels)
    expected = ev.verify(emb, issame)

    vset = ev.VerificationSet.load(bin40)
    assert np.array_equal(vset.images, pixels) and vset.name == "synth"
    model.train()
    got = ev.evaluate(model, vset, batch_size=7)  # odd batch: the last one is short
    assert model.training, "evaluate restores the model's mode"
    model.eval()
    assert got["accuracies"] == expected["accuracies"] and got["thresholds"] == expected["thresholds"]
    assert got["xnorm"] == pytest.approx(xnorm, rel=1e-5) and got["pairs"] == 40

    out = tmp_path / "r.json"
    assert ev.main(["--model", str(path), "--backbone", "r_tiny", "--embedding", "32", "--device", "cpu",
                    "--bin", str(bin40), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| set | pairs | accuracy | threshold | XNorm |" in table
    assert f"| synth | 40 | {expected['accuracy']:.5f} ± {expected['std']:.5f} |" in table
    report = json.loads(out.read_text())["sets"]["synth"]
    assert report["accuracy"] == pytest.approx(expected["accuracy"]) and report["xnorm"] == pytest.approx(xnorm, rel=1e-5)


def test_numpy_images_and_flags_in_a_bin_are_accepted(tmp_path):
    rng = np.random.default_rng(0)
    bins = [np.frombuffer(encode(face(i // 2, rng)), np.uint8) for i in range(20)]
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps((bins, np.array([True, False] * 5)), protocol=2))
    images, issame = ev.load_bin(path)
    assert images[3] == bins[3].tobytes() and issame.tolist() == [True, False] * 5


# -- hostile and broken files ----------------------------------------------------------------------------

class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_malicious_pickle_is_refused_without_running(tmp_path, tiny_model):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([Evil(target), b"x"], [True])))
    with pytest.raises(ev.BinError) as err:
        ev.load_bin(path)
    assert str(path) in str(err.value) and "forbidden global posix.system" in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "ds_face.eval", "--model", str(tiny_model[0]), "--backbone",
                           "r_tiny", "--embedding", "32", "--bin", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("ds_face.eval: error: ") and "Traceback" not in proc.stderr
    for evil in ((eval, ("__import__('os').system('touch " + str(target) + "')",)),):
        path.write_bytes(pickle.dumps(evil[0]) + b"")  # builtins.eval as a bare global is refused too
        with pytest.raises(ev.BinError, match="forbidden global builtins.eval"):
            ev.load_bin(path)
    assert not target.exists()


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\nnot a pickle at all", "not a pickle"),
    (pickle.dumps(([b"a", b"b"], [True]))[:-9], "truncated"),
    (pickle.dumps({"bins": []}), "expected a pickled tuple (bins, issame_list), found a dict"),
    (pickle.dumps(([b"a", b"b"], [True], 3)), "found a tuple of length 3"),
    (pickle.dumps(([b"a", b"b", b"c"], [True])), "3 images, an odd number"),
    (pickle.dumps(([b"a", b"b", b"c", b"d"], [True])), "1 issame flags for 4 images; expected 2"),
    (pickle.dumps(([b"a", 7], [True])), "image 1 is a int, expected encoded image bytes"),
    (pickle.dumps(([b"a", b"b"], ["yes"])), "issame_list[0] is 'yes', expected a bool"),
    (pickle.dumps(([], [])), "holds no images"),
])
def test_broken_bins_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(ev.BinError) as err:
        ev.load_bin(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_undecodable_image_names_its_index_and_cli_exits_2(tmp_path, tiny_model, capsys):
    rng = np.random.default_rng(0)
    bins = [encode(face(i, rng)) for i in range(20)]
    bins[13] = b"\xff\xd8\xff garbage"
    path = tmp_path / "corrupt.bin"
    path.write_bytes(pickle.dumps((bins, [True] * 10)))
    with pytest.raises(ev.BinError, match=f"{path}: image 13 cannot be decoded"):
        ev.VerificationSet.load(path)
    args = ["--model", str(tiny_model[0]), "--backbone", "r_tiny", "--embedding", "32", "--device", "cpu"]
    assert ev.main(args + ["--bin", str(path)]) == 2
    assert f"ds_face.eval: error: {path}: image 13" in capsys.readouterr().err
    assert ev.main(args + ["--bin", str(tmp_path / "missing.bin")]) == 2
    assert "missing.bin: no such file" in capsys.readouterr().err
    assert ev.main(["--model", str(tmp_path / "nope.pt"), "--bin", str(path)]) == 2
    small = write_bin(tmp_path / "small.bin", 10)
    assert ev.main(["--model", str(tmp_path / "nope.pt"), "--bin", str(small)]) == 2
    assert "nope.pt: no such file" in capsys.readouterr().err


def huge_jpeg(width: int, height: int) -> bytes:
    """A real JPEG whose header says width x height: a small one encoded, then its SOF0 frame size set
    (a decoder believes the header and allocates for it, as with a real bomb)."""
    import simplejpeg
    data = bytearray(simplejpeg.encode_jpeg(np.zeros((16, 16, 3), np.uint8), colorspace="RGB"))
    sof = data.index(b"\xff\xc0")  # SOF0: marker, length(2), precision(1), height(2), width(2)
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def huge_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, format="PNG")  # 1-bit, compresses to a few KB
    return out.getvalue()


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_an_oversized_image_is_refused_from_its_header_without_decoding(tmp_path, tiny_model, capsys, kind):
    import simplejpeg
    rng = np.random.default_rng(0)
    bins = [encode(face(i, rng)) for i in range(20)]
    bins[7] = huge_jpeg(10000, 10000) if kind == "jpeg" else huge_png(10000, 10000)
    assert header_size(bins[7]) == (10000, 10000)
    if kind == "jpeg":
        assert simplejpeg.decode_jpeg_header(bins[7])[:2] == (10000, 10000)
    path = tmp_path / "bomb.bin"
    path.write_bytes(pickle.dumps((bins, [True] * 10)))
    expect = f"{path}: image 7 is 10000x10000, more than the 200704 pixels allowed"
    with pytest.raises(ev.BinError, match=expect):
        ev.VerificationSet.load(path)
    args = ["--model", str(tiny_model[0]), "--backbone", "r_tiny", "--embedding", "32", "--device", "cpu"]
    assert ev.main(args + ["--bin", str(path)]) == 2
    err = capsys.readouterr().err
    assert expect in err and "refused without decoding it" in err


def test_an_image_pil_itself_refuses_to_open_is_named(tmp_path):
    rng = np.random.default_rng(0)
    bins = [encode(face(i, rng)) for i in range(20)]
    bins[5] = huge_png(20000, 20000)  # over twice PIL's bomb limit: PIL raises on open
    path = tmp_path / "bomb.bin"
    path.write_bytes(pickle.dumps((bins, [True] * 10)))
    with pytest.raises(ev.BinError, match=rf"{path}: image 5(: Image size \(400000000 pixels\) exceeds limit| is "
                                          r"20000x20000, more than).*refused without decoding it"):
        ev.VerificationSet.load(path)


def test_a_larger_image_within_the_bound_is_resized(tmp_path):
    import simplejpeg
    rng = np.random.default_rng(0)
    bins = [encode(face(i, rng)) for i in range(20)]
    bins[3] = simplejpeg.encode_jpeg(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8), colorspace="RGB")
    bins[4] = encode(np.zeros((250, 250, 3), np.uint8))  # the LFW originals' size
    path = tmp_path / "big.bin"
    path.write_bytes(pickle.dumps((bins, [True] * 10)))
    assert ev.VerificationSet.load(path).images.shape == (20, 112, 112, 3)
    bins[3] = simplejpeg.encode_jpeg(np.zeros((449, 448, 3), np.uint8), colorspace="RGB")
    path.write_bytes(pickle.dumps((bins, [True] * 10)))
    with pytest.raises(ev.BinError, match="image 3 is 448x449, more than the 200704 pixels allowed"):
        ev.VerificationSet.load(path)


# -- config ---------------------------------------------------------------------------------------------

def test_eval_config_checks(tmp_path, bin40):
    from ds_face.config import BatchLayout, ConfigError, check_together, load_run_config
    cfg = load_run_config(f"{ROOT}/configs/cpu_demo.yaml", {"eval.sets": [str(bin40)], "eval.every_steps": 5})
    assert cfg.eval.sets == [str(bin40)] and cfg.eval.batch_size == 128
    with pytest.raises(ConfigError) as err:
        load_run_config(f"{ROOT}/configs/cpu_demo.yaml", {"eval.sets": [str(bin40), "nope/agedb_30.bin"],
                                                          "eval.batch_size": 0, "eval.every_steps": -1})
    for part in ("'eval.sets[1]': file not found: nope/agedb_30.bin", "'eval.batch_size' must be >= 1",
                 "'eval.every_steps' must be >= 0"):
        assert part in str(err.value)
    with pytest.raises(ConfigError, match="'eval.sets' must be list"):
        load_run_config(f"{ROOT}/configs/cpu_demo.yaml", {"eval.sets": str(bin40)})
    with pytest.raises(ConfigError, match="not supported under ZeRO stage 3"):
        check_together(cfg, BatchLayout(32, 1, 2, zero_stage=3), "run.yaml")
    check_together(cfg, BatchLayout(32, 1, 2, zero_stage=2), "run.yaml")


# -- during training: a real 2-rank deepspeed launch ---------------------------------------------------

def test_two_rank_training_evaluates_every_2_steps(tmp_path, bin40):
    from tests.conftest import launch
    out = tmp_path / "run"
    proc = launch("--config", "configs/cpu_demo.yaml", "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json",
                  "--set", "schedule.max_steps=4", "--set", "output.log_every=2", "--set", f"output.dir={out}",
                  "--set", "head.num_classes=200", "--set", "data.num_samples=256",
                  "--set", "eval.every_steps=2", "--set", f"eval.sets=[{bin40}]", "--set", "eval.batch_size=32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "training.log").read_text()
    for step in (2, 4):
        assert f"[synth][{step}]XNorm: " in log and f"[synth][{step}]Accuracy-Flip: " in log
        assert f"[synth][{step}]Accuracy-Highest: " in log
    reports = {s: json.loads((out / "eval" / f"step_{s}.json").read_text()) for s in (2, 4)}
    r2, r4 = reports[2]["sets"]["synth"], reports[4]["sets"]["synth"]
    assert r2["pairs"] == 40 and 0 <= r2["accuracy"] <= 1 and r2["xnorm"] > 0
    assert r4["best_accuracy"] == max(r2["accuracy"], r4["accuracy"])
    assert f"[synth][4]Accuracy-Flip: {r4['accuracy']:1.5f}+-{r4['std']:1.5f}" in log
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["step_2.json", "step_4.json"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    scalars = EventAccumulator(str(out / "tensorboard")).Reload()
    acc = scalars.Scalars("eval/synth/accuracy")
    assert [e.step for e in acc] == [2, 4] and acc[1].value == pytest.approx(r4["accuracy"])
    assert [e.step for e in scalars.Scalars("eval/synth/xnorm")] == [2, 4]


# -- ds_face.eval.embed ---------------------------------------------------------------------------------------

def test_embed_arrow_and_folder_round_trip(tmp_path, tiny_model, capsys):
    from tests.conftest import index_png, write_shards
    path, model = tiny_model
    common = ["--model", str(path), "--backbone", "r_tiny", "--embedding", "32", "--device", "cpu",
              "--batch-size", "8"]
    arrow = write_shards(tmp_path / "arrow", 21, 3, num_classes=4)
    out = tmp_path / "emb.npy"
    assert embed_cli.main(common + ["--arrow", str(arrow), "--out", str(out)]) == 0
    emb, labels = np.load(out), np.load(tmp_path / "emb.labels.npy")
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(index_png(i))).convert("RGB")) for i in range(21)])
    expected, _ = by_hand(model, pixels)  # shards 0..2 in manifest order, rows in order: sample i is row i
    assert emb.dtype == np.float32 and emb.shape == (21, 32) and labels.dtype == np.int64
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert labels.tolist() == [i % 4 for i in range(21)]
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]

    capsys.readouterr()
    assert embed_cli.main(common + ["--arrow", str(arrow), "--out", str(out)]) == 2
    assert "emb.npy exists; pass --overwrite" in capsys.readouterr().err

    folder = tmp_path / "faces"
    order = [("bob", "b.png", 5), ("alice", "z.png", 1), ("alice", "a.PNG", 2), ("bob", "a.jpg", 3)]
    for who, name, i in order:
        (folder / who).mkdir(parents=True, exist_ok=True)
        if name.endswith("jpg"):
            Image.open(io.BytesIO(index_png(i))).convert("RGB").save(folder / who / name, quality=95)
        else:
            (folder / who / name).write_bytes(index_png(i))
    (folder / "alice" / "notes.txt").write_text("ignored")
    assert embed_cli.main(common + ["--folder", str(folder), "--out", str(out), "--overwrite"]) == 0
    emb, labels = np.load(out), np.load(tmp_path / "emb.labels.npy")
    assert labels.tolist() == [0, 0, 1, 1]  # alice/a.PNG, alice/z.png, bob/a.jpg, bob/b.png
    expected, _ = by_hand(model, pixels[[2, 1]])
    np.testing.assert_allclose(emb[:2], expected, atol=1e-5)
    assert emb.shape == (4, 32)

    (folder / "bob" / "c.png").write_bytes(b"\x89PNG broken")
    assert embed_cli.main(common + ["--folder", str(folder), "--out", str(tmp_path / "e2.npy")]) == 2
    assert f"{folder / 'bob' / 'c.png'}: cannot decode the image" in capsys.readouterr().err
    assert not (tmp_path / "e2.npy").exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


# -- progress and --json overwrite (the real commands, stderr a terminal or a pipe) ------------------------------

def run_on_a_terminal(args: list[str]) -> tuple[int, str, str]:
    """Run ``python ARGS`` with stderr on a pseudo-terminal (stdout a pipe): (exit status, stdout, terminal)."""
    import os
    import pty
    from pathlib import Path
    import fcntl
    import struct
    import termios
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100, as a terminal has
    proc = subprocess.Popen([sys.executable, *args], cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=follower, text=True)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    out = proc.stdout.read()
    os.close(leader)
    return proc.wait(timeout=120), out, seen.decode(errors="replace")


def test_eval_and_embed_show_progress_on_a_terminal_only(tmp_path, tiny_model, bin40):
    from tests.test_arrow_loader import write_shards
    common = ["--model", str(tiny_model[0]), "--backbone", "r_tiny", "--embedding", "32", "--device", "cpu",
              "--batch-size", "16"]
    evaluate = ["-m", "ds_face.eval", *common, "--bin", str(bin40)]
    code, out, terminal = run_on_a_terminal(evaluate)
    assert code == 0 and "| synth | 40 |" in out
    assert "synth: 100%" in terminal and "80/80" in terminal and "img/s" in terminal
    code, out, terminal = run_on_a_terminal(evaluate + ["--no-progress"])
    assert code == 0 and "img" not in terminal
    piped = subprocess.run([sys.executable, *evaluate], capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and piped.stderr == "", "no bar into a pipe or a log file"

    arrow = write_shards(tmp_path / "arrow", 21, 3, num_classes=4)
    code, out, terminal = run_on_a_terminal(["-m", "ds_face.eval.embed", *common, "--arrow", str(arrow),
                                             "--out", str(tmp_path / "e.npy")])
    assert code == 0 and "embed: 100%" in terminal and "21/21" in terminal


def test_eval_json_is_not_replaced_without_overwrite(tmp_path, tiny_model, bin40, capsys):
    common = ["--model", str(tiny_model[0]), "--backbone", "r_tiny", "--embedding", "32", "--device", "cpu",
              "--bin", str(bin40)]
    report = tmp_path / "r.json"
    report.write_text("earlier results\n")
    assert ev.main(common + ["--json", str(report)]) == 2
    assert capsys.readouterr().err == (f"ds_face.eval: error: --json {report} exists; pass --overwrite to replace "
                                       f"it (nothing was done)\n")
    assert report.read_text() == "earlier results\n"
    assert ev.main(common + ["--json", str(tmp_path / "no" / "r.json")]) == 2
    assert "directory" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert ev.main(common + ["--json", str(report), "--overwrite"]) == 0
    assert json.loads(report.read_text())["sets"]["synth"]["pairs"] == 40
    assert not list(tmp_path.glob("*.partial"))


# -- .bin files that would cost more memory than they hold -------------------------------------------------

class _ObjectArray:
    """numpy's own pickle of an object array declaring 10**9 elements and holding two: numpy would allocate 8 GB."""

    def __reduce__(self):
        core = getattr(np, "_core", None) or np.core
        return (core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                (1, (10**9,), np.dtype("O"), False, [1, 2]))


def _peak_of(code: str, *args) -> tuple[int, str, int]:
    """(exit code, stderr, peak resident bytes) of ``python -c code args`` (measured as tests/test_hostile_models
    measures: from a small launcher, so that pytest's own memory does not count)."""
    from tests.test_hostile_models import run_measured
    return run_measured([sys.executable, "-c", code, *map(str, args)], None)


LOAD_BIN = ("import sys\nfrom ds_face.eval.bin_sets import load_bin, BinError\ntry:\n    load_bin(sys.argv[1])\n"
            "except BinError as e:\n    sys.exit(str(e))")


def test_a_bin_referencing_the_same_bytes_again_and_again_is_refused_before_copying(tmp_path):
    """A 1 MB .bin whose 2000 images are one bytearray referenced 2000 times: each copy would cost 1 MB (2 GB)."""
    rng = np.random.default_rng(0)
    image = bytearray(encode(face(0, rng)) + bytes(1 << 20))  # a real PNG, padded to 1 MB
    path = tmp_path / "shared.bin"
    path.write_bytes(pickle.dumps(([image] * 2000, [True] * 1000), protocol=5))
    assert path.stat().st_size < 2 << 20
    code, err, peak = _peak_of(LOAD_BIN, path)
    assert code == 1 and re.search(rf"{path}: images 0\.\.1 total \d+ bytes, more than the file's \d+ \(the same "
                                   r"image bytes referenced repeatedly\?\); refused before copying them", err), err
    print(f"shared-reference .bin: peak {peak >> 20} MiB")
    assert peak < 512 << 20


def test_a_bin_with_an_object_array_is_refused_before_numpy_allocates_it(tmp_path):
    path = tmp_path / "objects.bin"
    path.write_bytes(pickle.dumps(([_ObjectArray(), b"x"], [True]), protocol=2))
    code, err, peak = _peak_of(LOAD_BIN, path)
    assert code == 1 and f"{path}: refused to unpickle: it asks for a numpy array of dtype object" in err, err
    print(f"object-array .bin declaring 10**9 elements: peak {peak >> 20} MiB")
    assert peak < 512 << 20


def test_the_verification_table_is_the_shared_markdown_table():
    from ds_face.eval.verification import format_table
    from ds_face.runtime.markdown import markdown_table
    result = dict(pairs=6000, accuracy=0.99583, std=0.0031, threshold=1.4123, xnorm=22.5, val=0.98, val_std=0.01,
                  far=0.001)
    assert format_table({"lfw": result}) == (
        "| set | pairs | accuracy | threshold | XNorm | VAL@FAR=1e-3 |\n"
        "| --- | ---: | --- | ---: | ---: | --- |\n"
        "| lfw | 6000 | 0.99583 ± 0.00310 | 1.412 | 22.500 | 0.98000 ± 0.01000 @ 0.00100 |")
    assert markdown_table(["a", "b"], [[1, None]]) == "| a | b |\n| --- | --- |\n| 1 | None |"
    with pytest.raises(ValueError, match=r"align 'lx': one letter, l or r, for each of the 2 columns"):
        markdown_table(["a", "b"], [], align="lx")
