"""IJB 1:1 template verification after the backbone: template features, pair scores, the ROC, TAR@FAR and AUC
(arcface_torch's eval_ijbc.py rules); the results table and the ROC plot."""
from __future__ import annotations

import os
import time

import numpy as np

from ds_face.ijb.meta import IJBMeta
from ds_face.runtime.markdown import markdown_table

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
GRAM_BYTES = 128 << 20  # a scoring block of the template Gram matrix
RULE = ("TAR at the ROC point whose FPR is nearest each target FAR (arcface_torch eval_ijbc.py's rule; "
        "ties: the larger FPR, then the larger TPR)")


def template_features(feats: np.ndarray, scores: np.ndarray, templates: np.ndarray, medias: np.ndarray,
                      block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique template ids [T], L2-normalised template features [T, D] float32).

    Image feature x detector score; mean over the images of each (template, media); sum over a template's
    media; L2-normalise (a zero vector stays zero). The mean-then-sum is one weighted sum per template
    (weight = detector score / images in the image's media), in float64, over about ``block`` sorted images
    at a time (blocks end on template boundaries; numpy's ``sum(0)`` per template slice: ~20x faster here
    than ``add.reduceat`` along axis 0)."""
    order = np.lexsort((medias, templates))
    t_sorted, m_sorted = templates[order], medias[order]
    new_media = np.r_[True, (t_sorted[1:] != t_sorted[:-1]) | (m_sorted[1:] != m_sorted[:-1])]
    media_id = np.cumsum(new_media) - 1
    weight = scores[order].astype(np.float64) / np.bincount(media_id)[media_id]
    t_starts = np.flatnonzero(np.r_[True, t_sorted[1:] != t_sorted[:-1]])
    unique_t = t_sorted[t_starts]
    t_ends = np.r_[t_starts[1:], len(order)]
    out = np.empty((len(unique_t), feats.shape[1]), np.float64)
    first, n = 0, len(unique_t)
    while first < n:
        a = int(t_starts[first])
        last = max(first + 1, int(np.searchsorted(t_starts, a + block)))  # templates [first, last) in this block
        b = int(t_ends[last - 1])
        x = feats[order[a:b]] * weight[a:b, None]
        for t in range(first, last):
            out[t] = x[t_starts[t] - a:t_ends[t] - a].sum(0)
        first = last
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return unique_t, (out / np.maximum(norm, 1e-12)).astype(np.float32)


def template_index(unique_t: np.ndarray, ids: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(unique_t, ids)
    if (idx >= len(unique_t)).any() or (unique_t[np.minimum(idx, len(unique_t) - 1)] != ids).any():
        raise ValueError("a pair names a template with no features")
    return idx


def pair_scores(tfeats: np.ndarray, i1: np.ndarray, i2: np.ndarray, gram_bytes: int = GRAM_BYTES) -> np.ndarray:
    """float32 cosines tfeats[i1] . tfeats[i2] of L2-normalised template features, for millions of pairs.

    Pairs are ordered by their lower template index; rows [a, b) of the Gram matrix against templates >= a
    are computed by BLAS in blocks of at most ``gram_bytes`` and the pairs whose lower index is in [a, b)
    read from it. Memory: the block plus a few int arrays of the pair count."""
    t = len(tfeats)
    # the smallest index type: numpy sorts 16-bit keys by radix (IJB-C's 23k templates: ~10x faster)
    kind = np.uint16 if t <= np.iinfo(np.uint16).max else np.int32 if t <= np.iinfo(np.int32).max else np.int64
    lo, hi = np.minimum(i1, i2).astype(kind), np.maximum(i1, i2).astype(kind)
    order = np.argsort(lo, kind="stable")
    lo_s, hi_s = lo[order], hi[order]
    out = np.empty(len(i1), np.float32)
    rows = max(1, min(t, gram_bytes // (4 * max(t, 1))))
    bounds = np.searchsorted(lo_s, np.arange(0, t + rows, rows))
    for k, a in enumerate(range(0, t, rows)):
        p, q = bounds[k], bounds[k + 1]
        if p == q:
            continue
        gram = tfeats[a:a + rows] @ tfeats[a:].T  # [rows, t - a]
        out[order[p:q]] = gram[lo_s[p:q].astype(np.int64) - a, hi_s[p:q].astype(np.int64) - a]
    return out


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) as sklearn's ``roc_curve(labels, scores)`` (drop_intermediate=True): one point per
    distinct score (descending), collinear interior points dropped, (0, 0) prepended with threshold inf."""
    order = np.argsort(scores)[::-1]
    s = scores[order]
    ends = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # the last index of each distinct score
    tps = np.cumsum(labels[order], dtype=np.int64)[ends]
    fps = 1 + ends - tps
    thresholds = s[ends].astype(np.float64)
    if len(fps) > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.r_[0, fps], np.r_[0, tps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray, fars=FARS) -> dict[str, dict]:
    """{'1e-04': {'tar', 'fpr', 'threshold'}}: the ROC point whose FPR is nearest each target (first in
    descending-FPR order on a tie: the larger FPR, and at equal FPR the larger TPR: arcface_torch's flipud + min)."""
    f, t, th = fpr[::-1], tpr[::-1], thresholds[::-1]
    out = {}
    for far in fars:
        k = int(np.argmin(np.abs(f - far)))
        out[f"{far:.0e}"] = {"tar": float(t[k]), "fpr": float(f[k]), "threshold": float(th[k])}
    return out


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def evaluate_features(meta: IJBMeta, feats: np.ndarray, fars=FARS) -> tuple[dict, dict]:
    """(report, curve) from image features [N, D]: the protocol after the backbone. ``curve``: fpr, tpr, thresholds."""
    seconds = {}
    started = time.perf_counter()
    unique_t, tfeats = template_features(feats, meta.scores, meta.templates, meta.medias)
    seconds["templates"] = time.perf_counter() - started
    started = time.perf_counter()
    scores = pair_scores(tfeats, template_index(unique_t, meta.pair_t1), template_index(unique_t, meta.pair_t2))
    seconds["scoring"] = time.perf_counter() - started
    started = time.perf_counter()
    fpr, tpr, thresholds = roc_curve(meta.labels, scores)
    seconds["roc"] = time.perf_counter() - started
    genuine = int(meta.labels.sum())
    report = {"target": meta.target, "root": str(meta.root), "images": meta.images, "templates": int(len(unique_t)),
              "pairs": int(len(scores)), "genuine": genuine, "impostor": int(len(scores) - genuine),
              "embedding": int(feats.shape[1]), "tar_at_far": tar_at_far(fpr, tpr, thresholds, fars),
              "auc": auc(fpr, tpr), "rule": RULE, "seconds": seconds}
    return report, {"fpr": fpr, "tpr": tpr, "thresholds": thresholds, "scores": scores}


def format_table(reports: list[dict]) -> str:
    keys = list(reports[0]["tar_at_far"])
    rows = [[r["target"], r["templates"], r["pairs"], *(f"{100 * r['tar_at_far'][k]['tar']:.2f}" for k in keys),
             f"{100 * r['auc']:.2f}"] for r in reports]
    header = ["set", "templates", "pairs", *(f"TAR@FAR={k}" for k in keys), "AUC"]
    return markdown_table(header, rows, align="l" + "r" * (len(header) - 1)) + f"\n\nTAR and AUC in %; {RULE}."


ROC_FPR_MIN = 1e-6  # the plot's left edge


def plot_roc(path: str | os.PathLike, curve: dict, report: dict, label: str = "") -> None:
    """ROC on a log-FPR axis (1e-6 .. 1), the TAR@FAR points marked; written aside and renamed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ds_face.fileio import write_atomic
    # A log axis has no 0: points at FPR 0 (and below the axis' 1e-6) are drawn at its left edge, so the curve
    # starts where the ROC does (the caption says so) instead of silently losing its first points.
    fpr, tpr = np.maximum(curve["fpr"], ROC_FPR_MIN), curve["tpr"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    ax.plot(fpr, tpr, lw=1.2, label=f"{label or report['target']} (AUC = {100 * report['auc']:.2f} %)")
    points = report["tar_at_far"].values()
    ax.scatter([max(p["fpr"], ROC_FPR_MIN) for p in points], [p["tar"] for p in points], s=14, zorder=3,
               label="TAR@FAR points")
    ax.set_xscale("log")
    ax.set_xlim(ROC_FPR_MIN, 1.0)
    low = min([p["tar"] for p in points] + [0.3])
    ax.set_ylim(max(0.0, np.floor(low * 10) / 10), 1.0)
    ax.grid(linestyle="--", linewidth=0.6)
    ax.set_xlabel(f"False Positive Rate (log scale; FPR 0 drawn at {ROC_FPR_MIN:g})")
    ax.set_ylabel("True Positive Rate")
    ax.set_title(f"ROC on {report['target']}: {report['pairs']} pairs, {report['templates']} templates")
    ax.legend(loc="lower right")
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
