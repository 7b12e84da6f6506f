"""Face verification on InsightFace ``.bin`` pair sets (LFW, CFP-FP, AgeDB-30, ...), as arcface_torch does it.

    python -m ds_face.eval --model model.pt [--backbone r50] [--embedding 512] --bin lfw.bin cfp_fp.bin agedb_30.bin
    python -m ds_face.eval ijb --root /data/IJB_release/IJBC --target IJBC --model model.pt ...  (ds_face.ijb)

The protocol is arcface_torch's ``eval/verification.py``:

* every image and its horizontal flip go through the backbone (eval mode, input (pixel/255 - 0.5)/0.5, RGB);
  XNorm is the mean L2 norm of all those un-normalised embeddings (originals and flips);
* the two embeddings are summed and L2-normalised; a pair's distance is the squared euclidean distance of its
  normalised embeddings (= 2 - 2 cos);
* 10-fold cross-validation (sklearn ``KFold(10, shuffle=False)`` folds): on 9 folds the threshold in
  ``np.arange(0, 4, 0.01)`` with the best accuracy is chosen (the first one on a tie), ``dist < threshold``
  predicts "same"; the accuracy on the tenth fold is recorded. Reported: mean +- std of the 10 accuracies
  ("Accuracy-Flip"), the mean chosen threshold, XNorm;
* VAL@FAR=1e-3 as arcface_torch's ``calculate_val`` on the same folds (``val_at_far``; the threshold for the
  target FAR without scipy's interp1d, which refuses the repeated FAR values of nearly every grid:
  ``far_threshold``).

The ``.bin`` files are read by ``ds_face.eval.bin_sets`` (a restricted unpickler, images size-checked from their
header before decoding); the callback that evaluates during training is ``ds_face.training.callbacks``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from ds_face.eval.bin_sets import BinError, VerificationSet, decode_images, load_bin
from ds_face.fileio import write_json_atomic
from ds_face.eval.inference import add_model_args, flip_embeddings, load_model
from ds_face.runtime.markdown import markdown_table

THRESHOLDS = np.arange(0, 4, 0.01)
NUM_FOLDS = 10
VAL_THRESHOLDS = np.arange(0, 4, 0.001)  # arcface_torch's calculate_val grid
VAL_FAR = 1e-3

# -- the protocol (numpy only) -----------------------------------------------------------------------

def kfold(n: int, folds: int = NUM_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) indices of sklearn ``KFold(folds, shuffle=False).split(range(n))``."""
    if n < folds:
        raise ValueError(f"{n} pairs cannot be split into {folds} folds")
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    out, start = [], 0
    indices = np.arange(n)
    for size in sizes:
        test = indices[start:start + size]
        out.append((np.concatenate([indices[:start], indices[start + size:]]), test))
        start += size
    return out


def verify(embeddings: np.ndarray, issame: np.ndarray, folds: int = NUM_FOLDS,
           thresholds: np.ndarray = THRESHOLDS) -> dict:
    """arcface_torch's ``evaluate`` on L2-normalised embeddings [2P, D] (pair p = rows 2p, 2p+1).

    Returns accuracy (mean of the fold accuracies), std, threshold (mean of the chosen thresholds),
    pairs, and the per-fold ``accuracies`` and ``thresholds``."""
    issame = np.asarray(issame, dtype=bool)
    e1, e2 = embeddings[0::2], embeddings[1::2]
    if len(e1) != len(issame) or len(e2) != len(issame):
        raise ValueError(f"{len(embeddings)} embeddings for {len(issame)} pairs")
    dist = np.sum(np.square(e1 - e2), axis=1)
    correct = (dist[None, :] < np.asarray(thresholds)[:, None]) == issame[None, :]  # [T, P]
    accuracies, chosen = [], []
    for train, test in kfold(len(issame), folds):
        best = int(np.argmax(correct[:, train].sum(axis=1)))  # counts: exact ties, first best as np.argmax
        chosen.append(round(float(thresholds[best]), 10))  # a grid value: 0.52, not np.arange's 0.5199999999999999
        accuracies.append(float(correct[best, test].sum()) / len(test))
    acc = np.asarray(accuracies)
    val = val_at_far(dist, issame, folds)
    return {"accuracy": float(acc.mean()), "std": float(acc.std()), "threshold": float(np.mean(chosen)),
            "pairs": int(len(issame)), "accuracies": accuracies, "thresholds": chosen, **val}


def far_threshold(far_train: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """The threshold at which the (non-decreasing) training FAR curve reaches ``far_target``.

    arcface_torch: ``interp1d(far_train, thresholds, kind='slinear')(far_target)``, which current scipy refuses
    whenever ``far_train`` repeats a value (it nearly always does: FAR is 0 up to the first impostor).
    Here: i = the last threshold whose FAR is <= the target; if that FAR equals the target (or i is the
    last threshold), thresholds[i]; otherwise linear interpolation between (far[i], t[i]) and
    (far[i+1], t[i+1]), the two grid points where the step curve crosses the target. Where ``far_train`` has
    no repeated value this is exactly interp1d's answer. If the FAR never reaches the target: 0.0, as
    arcface_torch."""
    if far_train.max() < far_target:
        return 0.0
    i = int(np.searchsorted(far_train, far_target, "right")) - 1  # far_train[0] = 0 <= target, so i >= 0
    if far_train[i] == far_target or i == len(far_train) - 1:
        return float(thresholds[i])
    f0, f1, t0, t1 = far_train[i], far_train[i + 1], thresholds[i], thresholds[i + 1]
    return float(t0 + (far_target - f0) * (t1 - t0) / (f1 - f0))


def val_at_far(dist: np.ndarray, issame: np.ndarray, folds: int = NUM_FOLDS, far_target: float = VAL_FAR,
               thresholds: np.ndarray = VAL_THRESHOLDS) -> dict:
    """arcface_torch's ``calculate_val`` (VAL = TAR at FAR ``far_target``, 10 folds), vectorised.

    Per fold: the training FAR of each threshold (``dist < t`` accepts), the threshold for the target FAR
    (``far_threshold``), and on the test fold VAL = accepted genuine / genuine, FAR = accepted impostors /
    impostors (0 where a fold has none). Returns val (mean), val_std, far (mean), val_far_target."""
    vals, fars = [], []

    def rates(d, same, threshold):
        accept = d < threshold
        n_same, n_diff = int(same.sum()), int((~same).sum())
        return (float((accept & same).sum()) / n_same if n_same else 0.0,
                float((accept & ~same).sum()) / n_diff if n_diff else 0.0)

    for train, test in kfold(len(issame), folds):
        impostor = np.sort(dist[train][~issame[train]])
        far_train = (np.searchsorted(impostor, thresholds, "left") / len(impostor) if len(impostor)
                     else np.zeros(len(thresholds)))  # count of impostor distances < t
        val, far = rates(dist[test], issame[test], far_threshold(far_train, thresholds, far_target))
        vals.append(val)
        fars.append(far)
    return {"val": float(np.mean(vals)), "val_std": float(np.std(vals)), "far": float(np.mean(fars)),
            "val_far_target": far_target}


def evaluate(model, data, batch_size: int = 128, device=None, deadline: float | None = None,
             progress: bool = False) -> dict:
    """Verification figures of ``model`` on ``data``: a VerificationSet, a path to a .bin, or (uint8 images
    [2P, 112, 112, 3], issame [P]). Returns accuracy, std, threshold, xnorm, pairs (+ per-fold lists)."""
    if isinstance(data, (str, os.PathLike)):
        data = VerificationSet.load(data)
    images, issame = (data.images, data.issame) if isinstance(data, VerificationSet) else data
    started = time.perf_counter()
    label = (data.name if isinstance(data, VerificationSet) else "embedding") if progress else None
    embeddings, xnorm = flip_embeddings(model, images, batch_size, device, deadline, label)
    result = verify(embeddings, issame)
    result["xnorm"] = xnorm
    result["seconds"] = time.perf_counter() - started
    return result


def format_table(results: dict[str, dict]) -> str:
    rows = [[name, r["pairs"], f"{r['accuracy']:.5f} ± {r['std']:.5f}", f"{r['threshold']:.3f}", f"{r['xnorm']:.3f}",
             f"{r['val']:.5f} ± {r['val_std']:.5f} @ {r['far']:.5f}"] for name, r in results.items()]
    return markdown_table(["set", "pairs", "accuracy", "threshold", "XNorm", "VAL@FAR=1e-3"], rows, align="lrlrrl")


def set_names(paths: list[str]) -> list[str]:
    """File stems (lfw, cfp_fp, ...), or the full paths where two stems collide."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else str(p) for s, p in zip(stems, paths)]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ijb"]:  # python -m ds_face.eval ijb --root ... (IJB-B/C 1:1 verification, ds_face.ijb)
        from ds_face.ijb import main as ijb_main
        return ijb_main(argv[1:])
    parser = argparse.ArgumentParser(prog="ds_face.eval", description=__doc__.splitlines()[0],
                                     epilog="IJB-B/C: python -m ds_face.eval ijb --help")
    add_model_args(parser)
    parser.add_argument("--bin", nargs="+", required=True, metavar="SET.bin", help="InsightFace verification sets")
    parser.add_argument("--json", metavar="PATH", help="also write the figures (and per-fold values) as JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (shown on stderr only when stderr is a terminal)")
    args = parser.parse_args(argv)
    progress = not args.no_progress and sys.stderr.isatty()

    try:
        if args.batch_size < 1:
            raise BinError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.json and Path(args.json).exists() and not args.overwrite:
            raise BinError(f"--json {args.json} exists; pass --overwrite to replace it (nothing was done)")
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise BinError(f"--json {args.json}: directory {Path(args.json).parent} does not exist")
        if args.json and not os.access(Path(args.json).resolve().parent, os.W_OK | os.X_OK):
            raise BinError(f"--json {args.json}: directory {Path(args.json).parent} is not writable (nothing was done)")
        encoded = {name: (path, load_bin(path)) for name, path in zip(set_names(args.bin), args.bin)}
        try:
            model = load_model(args.model, args.backbone, args.embedding, args.device)
        except ValueError as err:  # the model file's or the backbone's problem (ConfigError, BackboneFileError)
            raise BinError(str(err)) from None
        results = {}
        for name, (path, (images, issame)) in encoded.items():
            vset = VerificationSet(name, path, decode_images(images, path), issame)
            results[name] = evaluate(model, vset, args.batch_size, progress=progress)
    except BinError as err:
        print(f"ds_face.eval: error: {err}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json:
        report = {"model": args.model, "backbone": args.backbone, "embedding": args.embedding,
                  "sets": {n: {**r, "path": encoded[n][0]} for n, r in results.items()}}
        try:
            write_json_atomic(args.json, report)
        except OSError as err:  # the directory changed meanwhile, the disk is full, ...
            print(f"ds_face.eval: error: cannot write --json {args.json}: {err.strerror or err} (the figures are "
                  f"above)", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
