"""IJB-B/C 1:1 verification (ds_face.ijb, ``python -m ds_face.eval ijb``) and VAL@FAR on the .bin sets.

A synthetic IJB-layout set is generated here: smooth per-identity face textures placed into larger canvases by
known similarity transforms (so the landmarks, and the transform alignment must undo, are known exactly),
several media per template, every template pair scored (genuine and impostor). The protocol is checked
against plain re-statements (loops, as arcface_torch's eval_ijbc.py is written), the command end to end with
the weights of a real r_tiny, and bad inputs are named by file and line with nothing written.
"""
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ds_face.eval import verification as ev
from ds_face.eval.inference import l2_normalize
from ds_face import ijb

IDENTITIES, TEMPLATES_PER_ID = 11, 4
ID_AMPLITUDE, NOISE_AMPLITUDE = 20.0, 30.0


# -- the synthetic set ---------------------------------------------------------------------------------------

def smooth_texture(rng, size=112, cells=7, amplitude=90.0, base=None) -> np.ndarray:
    """A smooth RGB image: a coarse random grid upsampled bicubically (bilinear resampling barely changes it)."""
    grid = rng.normal(0, 1, (cells, cells, 3))
    up = np.stack([np.asarray(Image.fromarray(grid[..., c].astype(np.float32), mode="F")
                              .resize((size, size), Image.BICUBIC)) for c in range(3)], -1)
    out = (128.0 if base is None else base) + amplitude * up
    return out.clip(0, 255)


def similarity(scale, angle_deg, tx, ty) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def render(face: np.ndarray, m: np.ndarray, canvas_hw, background: np.ndarray) -> np.ndarray:
    """The canvas whose pixel (u, v) shows face at m^-1 (u, v): plain numpy bilinear, pixel centres at integers."""
    h, w = canvas_hw
    a, b = m[:, :2], m[:, 2]
    ai = np.linalg.inv(a)
    v, u = np.mgrid[0:h, 0:w]
    pts = np.stack([u.ravel(), v.ravel()], 1).astype(np.float64)
    src = (pts - b) @ ai.T
    x, y = src[:, 0], src[:, 1]
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    size = face.shape[0]
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < size) & (y0 + 1 < size)
    x0c, y0c = np.clip(x0, 0, size - 2), np.clip(y0, 0, size - 2)
    val = (face[y0c, x0c] * ((1 - fx) * (1 - fy))[:, None] + face[y0c, x0c + 1] * (fx * (1 - fy))[:, None]
           + face[y0c + 1, x0c] * ((1 - fx) * fy)[:, None] + face[y0c + 1, x0c + 1] * (fx * fy)[:, None])
    out = np.where(inside[:, None], val, background.reshape(-1, 3))
    return out.reshape(h, w, 3).round().clip(0, 255).astype(np.uint8)


def place(face, rng):
    """(canvas uint8, landmarks [5, 2], face->canvas transform): a random scale 1.25-1.8, rotation, offset."""
    scale, angle = rng.uniform(1.25, 1.8), rng.uniform(-30, 30)
    side = int(np.ceil(112 * scale * 1.45)) + int(rng.integers(0, 24))
    m = similarity(scale, angle, 0, 0)
    corners = np.array([[0, 0], [111, 0], [0, 111], [111, 111]]) @ m[:, :2].T
    lo, hi = corners.min(0), corners.max(0)
    m[:, 2] = rng.uniform(-lo, side - hi)  # the whole face inside the canvas
    background = rng.uniform(0, 255, (side, side, 3))
    canvas = render(face, m, (side, side), background)
    return canvas, ijb.ARCFACE_TEMPLATE @ m[:, :2].T + m[:, 2], m


def make_ijb(root, seed=0, target="IJBC"):
    """Write an IJB-layout set; returns a dict of what was generated (identities, template ids, labels)."""
    rng = np.random.default_rng(seed)
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    common = smooth_texture(rng)  # identities share a face and differ by less than images of one identity vary
    ids = [common + smooth_texture(rng, amplitude=ID_AMPLITUDE, base=0.0) for _ in range(IDENTITIES)]
    lmk_lines, tid_lines, identity_of = [], [], {}
    n = 0
    for ident in range(IDENTITIES):
        for k in range(TEMPLATES_PER_ID):
            tid = 100 + 7 * (ident * TEMPLATES_PER_ID + k)  # sparse, unordered ids like the release's
            identity_of[tid] = ident
            for media in range(int(rng.integers(2, 5))):
                mid = int(rng.integers(1, 10**6))
                for _ in range(int(rng.integers(1, 4))):
                    n += 1
                    face = (ids[ident] + smooth_texture(rng, amplitude=NOISE_AMPLITUDE, base=0.0)).clip(0, 255)
                    canvas, marks, _ = place(face, rng)
                    name = f"{n}.jpg"
                    Image.fromarray(canvas).save(root / "loose_crop" / name, quality=95)
                    score = rng.uniform(0.3, 1.0)
                    lmk_lines.append(" ".join([name] + [f"{v:.3f}" for v in marks.ravel()] + [f"{score:.6f}"]))
                    tid_lines.append(f"{name} {tid} {mid}")
    tids = list(identity_of)
    rng.shuffle(tids)
    pairs = [(a, b, int(identity_of[a] == identity_of[b])) for i, a in enumerate(tids) for b in tids[i + 1:]]
    t = target.lower()
    (root / "meta" / f"{t}_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    (root / "meta" / f"{t}_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (root / "meta" / f"{t}_template_pair_label.txt").write_text("".join(f"{a} {b} {l}\n" for a, b, l in pairs))
    return {"images": n, "templates": len(tids), "pairs": len(pairs), "genuine": sum(p[2] for p in pairs)}


@pytest.fixture(scope="module")
def ijb_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("IJBC")
    return root, make_ijb(root)


@pytest.fixture(scope="module")
def tiny(tiny_model):  # conftest's r_tiny and its model.pt
    return tiny_model


# -- alignment -------------------------------------------------------------------------------------------------

def test_umeyama_recovers_a_known_transform_and_equals_linear_least_squares():
    m = similarity(1.7, 23.0, 40.5, -12.25)
    src = np.random.default_rng(0).uniform(0, 200, (5, 2))
    dst = src @ m[:, :2].T + m[:, 2]
    assert np.allclose(ijb.umeyama(src, dst), m, atol=1e-9)
    # noisy points: the optimum over x' = a x - b y + tx, y' = b x + a y + ty is a linear least-squares problem
    rng = np.random.default_rng(1)
    for _ in range(20):
        src = rng.uniform(0, 300, (5, 2))
        dst = rng.uniform(0, 112, (5, 2))
        rows, rhs = [], []
        for (x, y), (u, v) in zip(src, dst):
            rows += [[x, -y, 1, 0], [y, x, 0, 1]]
            rhs += [u, v]
        a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
        assert np.allclose(ijb.umeyama(src, dst), [[a, -b, tx], [b, a, ty]], atol=1e-8)
    with pytest.raises(ValueError, match="same point"):
        ijb.umeyama(np.ones((5, 2)), dst)


def test_warp_follows_cv2_pixel_convention():
    """An integer translation moves pixels exactly: output(x, y) = input(x + 5, y + 3)."""
    img = np.random.default_rng(0).integers(0, 256, (150, 160, 3)).astype(np.uint8)
    out = ijb.warp_affine(img, np.array([[1.0, 0, -5], [0, 1.0, -3]]))
    assert np.array_equal(out, img[3:115, 5:117])
    half = ijb.warp_affine(img, np.array([[1.0, 0, -5.5], [0, 1.0, -3]]))  # halfway between two columns
    expect = (img[3:115, 5:117].astype(int) + img[3:115, 6:118]) / 2
    assert np.abs(half[:, :-1].astype(int) - expect[:, :-1]).max() <= 1


def opencv_fixed_point_warp(image, matrix, size=112):
    """A plain restatement of what cv2.warpAffine computes (OpenCV's imgwarp.cpp, INTER_LINEAR,
    BORDER_CONSTANT 0): the 2x3 map inverted in double; each output pixel's source position in 1/1024 px,
    rounded half to even, then cut to 1/32 px; bilinear weights in 15-bit fixed point; the sum rounded to the
    nearest grey level. Pixels outside the image read 0."""
    m = np.asarray(matrix, np.float64)
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    d = 1.0 / det
    a11, a12, a21, a22 = m[1, 1] * d, -m[0, 1] * d, -m[1, 0] * d, m[0, 0] * d
    b1, b2 = -a11 * m[0, 2] - a12 * m[1, 2], -a21 * m[0, 2] - a22 * m[1, 2]
    out = np.zeros((size, size, image.shape[2]), np.int64)
    h, w = image.shape[:2]
    for y in range(size):
        x0 = int(np.rint((a12 * y + b1) * 1024)) + 16
        y0 = int(np.rint((a22 * y + b2) * 1024)) + 16
        for x in range(size):
            sx = (x0 + int(np.rint(a11 * x * 1024))) >> 5
            sy = (y0 + int(np.rint(a21 * x * 1024))) >> 5
            ix, fx, iy, fy = sx >> 5, sx & 31, sy >> 5, sy & 31
            total = np.zeros(image.shape[2], np.int64)
            for dy, dx, weight in ((0, 0, (32 - fx) * (32 - fy)), (0, 1, fx * (32 - fy)),
                                   (1, 0, (32 - fx) * fy), (1, 1, fx * fy)):
                if 0 <= iy + dy < h and 0 <= ix + dx < w:
                    total += image[iy + dy, ix + dx].astype(np.int64) * weight * 32
            out[y, x] = (total + (1 << 14)) >> 15
    return out.astype(np.uint8)


def test_crops_equal_opencv_fixed_point_bilinear_with_no_bias():
    """arcface_torch's eval_ijbc.py crops with cv2.warpAffine: ds_face's crops equal OpenCV's arithmetic
    (restated above) on random images and similarity transforms, borders included: within one grey level on
    every pixel and no bias (PIL's bilinear, used before, truncated: a mean of -0.2 to -0.5 grey level)."""
    rng = np.random.default_rng(11)
    for _ in range(6):
        h, w = rng.integers(90, 300, 2)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        angle = rng.uniform(-3, 3)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        marks = ijb.ARCFACE_TEMPLATE * rng.uniform(0.4, 2.5) + rng.uniform(-40, 150, 2)
        marks = (marks - marks.mean(0)) @ rot.T + marks.mean(0) + rng.normal(0, 1.5, marks.shape)
        ours = ijb.align(img, marks).astype(int)
        reference = opencv_fixed_point_warp(img, ijb.umeyama(marks, ijb.ARCFACE_TEMPLATE)).astype(int)
        assert np.abs(ours - reference).max() <= 1
        assert abs((ours - reference).mean()) <= 0.02
        assert np.array_equal(ours, reference)  # in fact byte for byte


def test_alignment_recovers_the_placed_face():
    rng = np.random.default_rng(5)
    for _ in range(6):
        face = smooth_texture(rng)
        canvas, marks, m = place(face, rng)
        assert canvas.shape[0] > 112 * 1.25
        assert np.allclose(ijb.umeyama(marks, ijb.ARCFACE_TEMPLATE)[:, :2] @ m[:, :2], np.eye(2), atol=1e-9)
        aligned = ijb.align(canvas, marks).astype(float)
        inner = (slice(3, -3), slice(3, -3))
        err = np.abs(aligned[inner] - face[inner]).mean()
        shifted = np.abs(np.roll(aligned, 3, axis=1)[inner] - face[inner]).mean()
        assert err < 1.5 and shifted > 4 * err, (err, shifted)


def test_aligned_jpeg_from_the_set_matches_its_face(ijb_set):
    root, _ = ijb_set
    meta = ijb.read_meta(root, "IJBC")
    out = ijb.load_aligned(root / "loose_crop" / meta.names[0], meta.landmarks[0], "here")
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    start, chunk = next(ijb.aligned_chunks(meta, workers=0, chunk=5))
    assert start == 0 and np.array_equal(chunk[0], out)


# -- the protocol -----------------------------------------------------------------------------------------------

def reference_templates(feats, scores, templates, medias):
    """eval_ijbc.py's image2template_feature with the detector score, re-stated with loops."""
    x = feats * scores[:, None]
    result = {}
    for t in sorted(set(templates.tolist())):
        by_media = {}
        for i in np.flatnonzero(templates == t):
            by_media.setdefault(int(medias[i]), []).append(x[i])
        total = sum(np.mean(rows, axis=0) for rows in by_media.values())
        result[t] = total / np.linalg.norm(total)
    return result


def test_template_aggregation_equals_the_protocol_restated():
    rng = np.random.default_rng(3)
    n = 500
    templates = rng.integers(0, 60, n) * 3 + 11
    medias = rng.integers(0, 4, n)  # media ids repeat across templates: a media belongs to its template
    feats, scores = rng.normal(size=(n, 16)).astype(np.float32), rng.uniform(0.1, 1, n).astype(np.float32)
    ref = reference_templates(feats.astype(np.float64), scores.astype(np.float64), templates, medias)
    for block in (7, 64, 16384):  # blocks end on media boundaries, whatever their size
        unique_t, got = ijb.template_features(feats, scores, templates, medias, block=block)
        assert unique_t.tolist() == sorted(ref)
        assert np.allclose(got, np.stack([ref[t] for t in unique_t]), atol=1e-6)


def test_pair_scores_equal_direct_cosines_across_gram_blocks():
    rng = np.random.default_rng(4)
    f = l2_normalize(rng.normal(size=(97, 24))).astype(np.float32)
    i1, i2 = rng.integers(0, 97, 5000), rng.integers(0, 97, 5000)
    direct = np.einsum("ij,ij->i", f[i1].astype(np.float64), f[i2].astype(np.float64))
    for gram_bytes in (1, 4 * 97 * 10, 1 << 30):  # one row per block, 10 rows, everything at once
        assert np.allclose(ijb.pair_scores(f, i1, i2, gram_bytes), direct, atol=1e-6)


def reference_roc(labels, scores):
    """sklearn roc_curve (drop_intermediate) re-stated: thresholds = distinct scores, accept score >= t."""
    pts = [(0, 0, np.inf)]
    for t in sorted(set(scores.tolist()), reverse=True):
        accept = scores >= t
        pts.append((int((accept & (labels == 0)).sum()), int((accept & (labels == 1)).sum()), t))
    inner = pts[1:]  # (0, 0) is prepended after the dropping, as in sklearn
    kept = [pts[0]]
    for k, p in enumerate(inner):
        if 0 < k < len(inner) - 1:
            a, c = inner[k - 1], inner[k + 1]
            if (c[0] - p[0]) == (p[0] - a[0]) and (c[1] - p[1]) == (p[1] - a[1]):
                continue  # collinear with both neighbours at equal steps: dropped
        kept.append(p)
    neg, pos = kept[-1][0], kept[-1][1]
    return ([p[0] / neg for p in kept], [p[1] / pos for p in kept], [p[2] for p in kept])


def reference_tar(fpr, tpr, far):
    """eval_ijbc.py: flipud, then min over (|fpr - far|, index)."""
    fpr, tpr = fpr[::-1], tpr[::-1]
    _, k = min(zip([abs(f - far) for f in fpr], range(len(fpr))))
    return tpr[k], fpr[k]


@pytest.mark.parametrize("ties", [False, True])
def test_tar_at_far_equals_a_direct_computation_from_the_roc(ties):
    rng = np.random.default_rng(7)
    labels = (rng.random(3000) < 0.1).astype(np.int8)
    scores = (rng.normal(0, 1, 3000) + 2.0 * labels).astype(np.float32)
    if ties:  # many equal scores: vertical, horizontal and diagonal runs in the ROC
        scores = np.round(scores, 1)
    fpr, tpr, thr = ijb.roc_curve(labels, scores)
    rf, rt, rth = reference_roc(labels, scores)
    assert np.allclose(fpr, rf) and np.allclose(tpr, rt) and np.array_equal(thr, np.array(rth, np.float64))
    fars = (1e-4, 1e-3, 3e-3, 1e-2, 1e-1, 0.5)
    got = ijb.tar_at_far(fpr, tpr, thr, fars)
    for far in fars:
        tar, at = reference_tar(rf, rt, far)
        assert got[f"{far:.0e}"]["tar"] == tar and got[f"{far:.0e}"]["fpr"] == at
    # AUC: the trapezoids equal the Mann-Whitney probability P(genuine > impostor) + P(tie) / 2
    pos, neg = scores[labels == 1], scores[labels == 0]
    mw = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert ijb.auc(fpr, tpr) == pytest.approx(mw, abs=1e-12)


# -- VAL@FAR on the .bin sets ---------------------------------------------------------------------------------

def reference_val(dist, issame, far_target=1e-3, thresholds=ev.VAL_THRESHOLDS, folds=10):
    """arcface_torch calculate_val loop for loop; interp1d(slinear) replaced by its value on the segment that
    crosses the target (the last threshold with FAR <= target and the next one)."""
    def val_far(threshold, d, same):
        accept = d < threshold
        n_same, n_diff = same.sum(), (~same).sum()
        return ((accept & same).sum() / n_same if n_same else 0.0, (accept & ~same).sum() / n_diff if n_diff else 0.0)
    vals, fars = [], []
    for train, test in ev.kfold(len(issame), folds):
        far_train = [val_far(t, dist[train], issame[train])[1] for t in thresholds]
        if max(far_train) < far_target:
            threshold = 0.0
        else:
            i = max(k for k, f in enumerate(far_train) if f <= far_target)
            if far_train[i] == far_target or i == len(thresholds) - 1:
                threshold = thresholds[i]
            else:
                threshold = np.interp(far_target, far_train[i:i + 2], thresholds[i:i + 2])
        v, f = val_far(threshold, dist[test], issame[test])
        vals.append(v)
        fars.append(f)
    return np.mean(vals), np.std(vals), np.mean(fars)


def test_val_at_far_equals_the_restated_calculate_val_and_survives_repeated_fars():
    rng = np.random.default_rng(2)
    issame = rng.random(3000) < 0.5
    dist = np.where(issame, rng.normal(0.8, 0.3, 3000), rng.normal(1.8, 0.25, 3000)).clip(0, 4)
    got = ev.val_at_far(dist, issame)
    val, std, far = reference_val(dist, issame)
    assert got["val"] == pytest.approx(val) and got["val_std"] == pytest.approx(std)
    assert got["far"] == pytest.approx(far) and 0.05 < got["val"] < 1
    # where the FAR grid has no repeated value, the rule is plain linear interpolation (= interp1d slinear)
    far_train, thresholds = np.array([0.0, 0.0004, 0.0009, 0.002, 0.5]), np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert ev.far_threshold(far_train, thresholds, 1e-3) == pytest.approx(np.interp(1e-3, far_train, thresholds))
    assert ev.far_threshold(np.array([0, 0, 1e-3, 1e-3, 0.2]), thresholds, 1e-3) == 0.4  # plateau at the target
    assert ev.far_threshold(np.array([0, 0, 0, 0, 1e-4]), thresholds, 1e-3) == 0.0  # never reached
    r = ev.verify(l2_normalize(rng.normal(size=(200, 8))), rng.random(100) < 0.5)
    assert {"val", "val_std", "far"} <= set(r) and 0 <= r["val"] <= 1


# -- the command end to end ---------------------------------------------------------------------------------------

def by_hand_features(model, meta):
    """Aligned images through the model by hand: (x/255 - 0.5)/0.5, plain + flipped, summed."""
    aligned = np.stack([ijb.load_aligned(meta.root / "loose_crop" / n, m, "x")
                        for n, m in zip(meta.names, meta.landmarks)])
    x = (torch.from_numpy(aligned).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        return (model(x) + model(torch.flip(x, [3]))).numpy()


def test_cli_table_json_plot_and_reused_features(ijb_set, tiny, tmp_path, capsys):
    root, info = ijb_set
    path, model = tiny
    meta = ijb.read_meta(root, "IJBC")
    assert meta.images == info["images"] >= 200 and len(meta.labels) == info["pairs"]
    hand = by_hand_features(model, meta)
    expected, _ = ijb.evaluate_features(meta, hand)
    assert expected["templates"] == info["templates"] and expected["genuine"] == info["genuine"]

    out, feats, plot = tmp_path / "r.json", tmp_path / "f.npz", tmp_path / "roc.png"
    args = ["ijb", "--root", str(root), "--target", "IJBC", "--backbone", "r_tiny", "--embedding", "32",
            "--device", "cpu", "--batch-size", "50", "--no-progress", "--json", str(out)]
    assert ev.main(args + ["--model", str(path), "--workers", "2", "--features", str(feats),
                           "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert "| set | templates | pairs | TAR@FAR=1e-06 | TAR@FAR=1e-05 | TAR@FAR=1e-04 | TAR@FAR=1e-03 " \
           "| TAR@FAR=1e-02 | TAR@FAR=1e-01 | AUC |" in table
    row = " | ".join(f"{100 * expected['tar_at_far'][k]['tar']:.2f}" for k in expected["tar_at_far"])
    assert f"| IJBC | {info['templates']} | {info['pairs']} | {row} | {100 * expected['auc']:.2f} |" in table
    assert "nearest each target FAR" in table
    for key, point in expected["tar_at_far"].items():
        assert report["tar_at_far"][key]["tar"] == pytest.approx(point["tar"], abs=1.5 / info["genuine"])
    assert report["auc"] == pytest.approx(expected["auc"], abs=1e-4)
    assert report["images"] == info["images"] and report["rule"] == ijb.RULE
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(plot).size[0] >= 600

    # the saved features: the model's, and a second run reads them instead of the model
    saved = ijb.load_features(feats, meta)
    assert np.allclose(saved, hand, atol=1e-4)
    out2 = tmp_path / "r2.json"
    assert ev.main(args[:-1] + [str(out2), "--features", str(feats)]) == 0
    report2 = json.loads(out2.read_text())
    assert report2["tar_at_far"] == report["tar_at_far"] and report2["features_from"] == str(feats)
    assert report2["model"] is None

    # an existing --features is not replaced without --overwrite
    before = feats.read_bytes()
    assert ev.main(args + ["--model", str(path), "--features", str(feats), "--workers", "0"]) == 2
    assert "exists; drop --model to reuse it, or pass --overwrite" in capsys.readouterr().err
    assert feats.read_bytes() == before


# -- bad input -------------------------------------------------------------------------------------------------------

def edit(path, line_no, new):
    lines = path.read_text().splitlines()
    lines[line_no - 1] = new(lines[line_no - 1]) if callable(new) else new
    path.write_text("\n".join(lines) + "\n")


LMK, TID, PAIRS = "ijbc_name_5pts_score.txt", "ijbc_face_tid_mid.txt", "ijbc_template_pair_label.txt"


def _break(case, root):
    meta = root / "meta"
    if case == "missing meta":
        (meta / PAIRS).unlink()
        return f"{meta / PAIRS}: no such file"
    if case == "missing image":
        (root / "loose_crop" / "7.jpg").unlink()
        return f"{meta / LMK} line 7: image {root / 'loose_crop' / '7.jpg'} not found"
    if case == "landmark fields":
        edit(meta / LMK, 4, lambda s: s.rsplit(" ", 1)[0])
        return f"{meta / LMK} line 4: 11 fields, expected 12"
    if case == "landmark not a number":
        edit(meta / LMK, 5, lambda s: s.split(" ", 2)[0] + " x1 " + s.split(" ", 2)[2])
        return f"{meta / LMK} line 5: field 2 is 'x1', not a number"
    if case == "lists disagree":
        edit(meta / TID, 3, lambda s: "nope.jpg " + s.split(" ", 1)[1])
        return f"{meta / TID} line 3: names 'nope.jpg', but image 3 of {meta / LMK} is '3.jpg'"
    if case == "template without image":
        edit(meta / PAIRS, 9, lambda s: s.split()[0] + " 999999 0")
        return f"{meta / PAIRS} line 9: template 999999 (column 2) has no image in {meta / TID}"
    if case == "pair fields":
        edit(meta / PAIRS, 11, lambda s: s.rsplit(" ", 1)[0])
        return f"{meta / PAIRS} line 11: 2 fields, expected 3"
    if case == "label":
        edit(meta / PAIRS, 12, lambda s: s.rsplit(" ", 1)[0] + " 2")
        return f"{meta / PAIRS} line 12: label 2, expected 1"
    if case == "escaping name":
        edit(meta / LMK, 2, lambda s: "../../etc/passwd " + s.split(" ", 1)[1])
        return f"{meta / LMK} line 2: image name '../../etc/passwd' must be a relative path inside loose_crop/"
    if case == "undecodable image":
        (root / "loose_crop" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
        return f"{meta / LMK} line 3: image {root / 'loose_crop' / '3.jpg'} cannot be decoded"
    if case == "huge image":  # a real JPEG header claiming 60000x60000: refused before any decoding
        data = bytearray((root / "loose_crop" / "2.jpg").read_bytes())
        k = data.index(b"\xff\xc0")
        data[k + 5:k + 9] = struct.pack(">HH", 60000, 60000)
        (root / "loose_crop" / "2.jpg").write_bytes(bytes(data))
        return f"{meta / LMK} line 2: image {root / 'loose_crop' / '2.jpg'} is 60000x60000, more than the"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing meta", "missing image", "landmark fields", "landmark not a number",
                                  "lists disagree", "template without image", "pair fields", "label",
                                  "escaping name", "undecodable image", "huge image"])
def test_bad_input_is_named_by_file_and_line_and_nothing_is_written(case, ijb_set, tiny, tmp_path, capsys):
    root = tmp_path / "IJBC"
    shutil.copytree(ijb_set[0], root)
    message = _break(case, root)
    out, feats, plot = tmp_path / "r.json", tmp_path / "f.npz", tmp_path / "roc.png"
    code = ev.main(["ijb", "--root", str(root), "--model", str(tiny[0]), "--backbone", "r_tiny", "--embedding", "32",
                    "--device", "cpu", "--workers", "0", "--no-progress", "--json", str(out), "--features",
                    str(feats), "--plot", str(plot)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ds_face.eval ijb: error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["IJBC"], "nothing written, not even a partial file"


def test_features_of_another_image_list_and_other_argument_errors(ijb_set, tiny, tmp_path, capsys):
    root = tmp_path / "IJBC"
    shutil.copytree(ijb_set[0], root)
    meta = ijb.read_meta(root, "IJBC")
    feats = tmp_path / "f.npz"
    ijb.save_features(feats, np.zeros((meta.images, 4), np.float32), meta, {})
    edit(root / "meta" / LMK, 1, lambda s: s.replace(s.split()[1], "1.000", 1))  # one landmark moved
    base = ["ijb", "--root", str(root), "--no-progress"]
    assert ev.main(base + ["--features", str(feats)]) == 2
    assert "computed for another image list" in capsys.readouterr().err
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really")
    assert ev.main(base + ["--features", str(tmp_path / "bad.npz")]) == 2
    assert f"{tmp_path / 'bad.npz'}: not a readable features file" in capsys.readouterr().err
    assert ev.main(base) == 2
    assert "--model is required" in capsys.readouterr().err
    assert ev.main(base + ["--model", str(tiny[0]), "--json", str(tmp_path / "no" / "r.json")]) == 2
    assert "--json" in capsys.readouterr().err
    assert ev.main(base + ["--model", str(tiny[0]), "--features", str(tmp_path / "f.npy")]) == 2
    assert "must end with .npz" in capsys.readouterr().err


def test_eval_ijb_config_keys(ijb_set, tmp_path):
    from ds_face.config import BatchLayout, ConfigError, check_together, load_run_config
    root = str(ijb_set[0])
    import os
    cfg_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/cpu_demo.yaml")
    cfg = load_run_config(cfg_path, {"eval.ijb.root": root, "eval.ijb.target": "IJBC"})
    assert cfg.eval.ijb.root == root and cfg.eval.ijb.target == "IJBC" and cfg.eval.sets == []
    with pytest.raises(ConfigError) as err:
        load_run_config(cfg_path, {"eval.ijb.root": root, "eval.ijb.target": "IJBB"})
    assert f"'eval.ijb.root': {ijb_set[0] / 'meta' / 'ijbb_name_5pts_score.txt'}: no such file" in str(err.value)
    with pytest.raises(ConfigError, match="'eval.ijb.root': .*nope: no such directory"):
        load_run_config(cfg_path, {"eval.ijb.root": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="unknown key 'eval.ijb.tagret'"):
        load_run_config(cfg_path, {"eval.ijb.tagret": "IJBC"})
    with pytest.raises(ConfigError, match="'eval.ijb' is not supported under ZeRO stage 3"):
        check_together(cfg, BatchLayout(32, 1, 2, zero_stage=3), "run.yaml")


# -- during training: a real 2-rank deepspeed launch ---------------------------------------------------------------

def test_two_rank_training_evaluates_ijb_at_the_last_step(ijb_set, tmp_path):
    from tests.test_train_cli import launch
    root, info = ijb_set
    out = tmp_path / "run"
    proc = launch("--config", "configs/cpu_demo.yaml", "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json",
                  "--set", "schedule.max_steps=2", "--set", "output.log_every=1", "--set", f"output.dir={out}",
                  "--set", "head.num_classes=200", "--set", "data.num_samples=128", "--set", "eval.batch_size=64",
                  "--set", f"eval.ijb.root={root}", "--set", "eval.ijb.target=IJBC")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "training.log").read_text()
    assert f"IJB evaluation at the end of the run: IJBC ({info['images']} images, {info['pairs']} pairs)" in log
    assert "[IJBC][1]" not in log, "IJB runs at the last step only"
    report = json.loads((out / "eval" / "step_2.json").read_text())
    ijb_report = report["ijb"]
    assert report["sets"] == {} and ijb_report["pairs"] == info["pairs"] and ijb_report["embedding"] == 128
    for key, point in ijb_report["tar_at_far"].items():
        assert f"[IJBC][2]TAR@FAR={key}: {point['tar']:1.5f}" in log
    assert f"[IJBC][2]AUC: {ijb_report['auc']:1.5f}" in log
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["IJBC_step_2.png", "step_2.json"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    scalars = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in scalars.Scalars("eval/IJBC/tar@far=1e-04")] == [2]
    assert scalars.Scalars("eval/IJBC/auc")[0].value == pytest.approx(ijb_report["auc"])
