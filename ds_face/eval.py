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

**Safety of .bin files.** A ``.bin`` is a pickle of ``(bins, issame_list)``: encoded JPEG/PNG images (``bytes``,
pickled by Python 2 as ``str``, hence ``encoding="bytes"``) and one bool per pair. Unpickling can run arbitrary
code, so the files are read with a restricted unpickler that resolves no global at all except numpy's array
and scalar reconstructors (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``: they build arrays from bytes and
call nothing else) and ``_codecs.encode`` (protocol-2 pickles of Python 3 bytes), for third-party files that store images as uint8 arrays or flags as numpy bools. Anything
else (``os.system``, ``builtins.eval``, ...) is refused before it is called, with an error naming the file and
the global. The InsightFace files need no global. Every image's width and height are read from its header
before it is decoded; an image over ``MAX_PIXELS`` (16x 112x112) is refused, naming it, so a 10000x10000
JPEG costs nothing.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ds_face.fileio import write_json_atomic
from ds_face.inference import (  # noqa: F401 - the model-side half, shared with ijb and embed
    EvalTimeout, add_model_args, embed_flip, flip_embeddings, l2_normalize, load_model,
)

IMAGE_SIZE = (112, 112)
# The largest image a .bin may hold, in pixels: 16x the 112x112 the sets are made of (e.g. 448x448, or the
# 250x250 LFW originals), read from the header and refused before decoding: a 10000x10000 JPEG would
# otherwise take ~300 MB to decode (65535x65535: ~13 GB) before being resized to 112x112.
MAX_PIXELS = 16 * IMAGE_SIZE[0] * IMAGE_SIZE[1]
THRESHOLDS = np.arange(0, 4, 0.01)
NUM_FOLDS = 10
VAL_THRESHOLDS = np.arange(0, 4, 0.001)  # arcface_torch's calculate_val grid
VAL_FAR = 1e-3

# (module, name) globals a .bin may reference: numpy's array/scalar reconstruction, nothing that runs code.
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how pickle protocol < 3 stores Python 3 bytes (str -> bytes via latin-1)
})


class BinError(ValueError):
    """A verification ``.bin`` that cannot be used; the message names the file (and the image index)."""


class _Forbidden(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _Forbidden(f"references the forbidden global {module}.{name}")

    def persistent_load(self, pid):
        raise _Forbidden(f"uses a persistent id ({pid!r})")


_PICKLE_STARTS = (b"\x80", b"(", b"]", b")", b"}")  # PROTO (protocol 2+), or a protocol 0/1 container opcode


def _unpickle(path: Path, data: bytes):
    if data[:1] not in _PICKLE_STARTS:
        raise BinError(f"{path}: not a pickle (starts with {data[:8]!r}); expected an InsightFace verification .bin")
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _Forbidden as err:
        raise BinError(f"{path}: refused to unpickle: it {err} (a .bin holds "
                       f"only image bytes and bools; this file may be malicious)") from None
    except EOFError:
        raise BinError(f"{path}: truncated (the pickle ends before its STOP opcode)") from None
    except RecursionError:
        raise BinError(f"{path}: not a verification .bin (pickle nested too deeply)") from None
    except Exception as err:  # UnpicklingError, ValueError, struct.error, ... from a damaged or foreign file
        what = "truncated or damaged pickle" if data[:1] == b"\x80" else "not a pickle"
        raise BinError(f"{path}: {what} ({type(err).__name__}: {err})") from None


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """(encoded images, issame[bool] of len(images) // 2) from an InsightFace ``.bin``, checked for shape."""
    path = Path(path)
    if not path.is_file():
        raise BinError(f"{path}: no such file")
    obj = _unpickle(path, path.read_bytes())
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        what = f"a {type(obj).__name__}" + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else "")
        raise BinError(f"{path}: expected a pickled tuple (bins, issame_list), found {what}")
    bins, flags = obj
    if not isinstance(bins, (list, tuple)):
        raise BinError(f"{path}: bins must be a list of encoded images, found a {type(bins).__name__}")
    if not isinstance(flags, (list, tuple, np.ndarray)):
        raise BinError(f"{path}: issame_list must be a list of bools, found a {type(flags).__name__}")
    images = []
    for i, item in enumerate(bins):
        if isinstance(item, (bytes, bytearray)):
            images.append(bytes(item))
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
            images.append(item.tobytes())
        else:
            raise BinError(f"{path}: image {i} is a {type(item).__name__}, expected encoded image bytes")
    if not images:
        raise BinError(f"{path}: holds no images")
    if len(images) % 2:
        raise BinError(f"{path}: {len(images)} images, an odd number (pairs are consecutive images)")
    issame = []
    for i, flag in enumerate(list(flags)):
        if isinstance(flag, (bool, np.bool_)) or (isinstance(flag, (int, np.integer)) and flag in (0, 1)):
            issame.append(bool(flag))
        else:
            raise BinError(f"{path}: issame_list[{i}] is {flag!r}, expected a bool")
    if len(issame) * 2 != len(images):
        raise BinError(f"{path}: {len(issame)} issame flags for {len(images)} images; expected "
                       f"{len(images) // 2} (one per pair)")
    return images, np.asarray(issame, dtype=bool)


def decode_images(images: list[bytes], where: str = "", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 [N, 112, 112, 3] RGB; an image of another size is resized to 112x112 (arcface_torch resizes too).

    Every image's size is read from its header first; one larger than ``max_pixels`` is refused, naming it,
    before any of its pixels are decoded."""
    from PIL import Image

    from ds_face.images import ImageTooLarge, decode_bounded
    out = np.empty((len(images), *IMAGE_SIZE, 3), np.uint8)
    for i, data in enumerate(images):
        try:
            pixels = decode_bounded(data, max_pixels)
            if pixels.shape[:2] != IMAGE_SIZE:
                pixels = np.asarray(Image.fromarray(pixels).resize(IMAGE_SIZE[::-1], Image.BILINEAR))
        except ImageTooLarge as err:
            raise BinError(f"{where}: image {i} {err} (16x {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}); refused without "
                           f"decoding it") from None
        except Image.DecompressionBombError as err:  # over twice PIL's limit: PIL refuses to open it at all
            raise BinError(f"{where}: image {i}: {err}; refused without decoding it") from None
        except Exception as err:
            raise BinError(f"{where}: image {i} cannot be decoded ({type(err).__name__}: {err})") from None
        out[i] = pixels
    return out


@dataclass
class VerificationSet:
    """A decoded pair set: images [2P, 112, 112, 3] uint8 (pair p = images 2p, 2p+1), issame [P] bool."""
    name: str
    path: str
    images: np.ndarray
    issame: np.ndarray

    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> "VerificationSet":
        encoded, issame = load_bin(path)
        return cls(name or Path(path).stem, str(path), decode_images(encoded, str(path)), issame)

    @property
    def pairs(self) -> int:
        return len(self.issame)


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
        chosen.append(float(thresholds[best]))
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


class TrainingEvaluator:
    """The ``eval:`` block of the run YAML during training: every ``eval.every_steps`` optimizer steps and at
    the last step, rank 0 evaluates the backbone on each set while the other ranks wait.

    The wait is a broadcast from rank 0 (a collective under the process-group timeout, DS_FACE_TIMEOUT_MIN,
    default 30 min), which also carries "rank 0 failed", so that every rank stops instead of hanging. To stay
    under that timeout, rank 0 gives up on the remaining sets (warning) once half of it has passed.
    Unsupported under ZeRO-3 (parameters partitioned; ``check_together`` refuses the combination)."""

    def __init__(self, trainer, progress=None):
        import torch
        self.cfg = trainer.cfg.eval
        self.trainer, self.rank = trainer, trainer.rank
        self.writer = getattr(progress, "writer", None)
        self.enabled = bool(self.cfg.sets) or bool(self.cfg.ijb.root)
        self.sets: list[VerificationSet] = []
        self.ijb = None  # ds_face.ijb.IJBMeta: eval.ijb, parsed once, evaluated at the last step
        self.best: dict[str, float] = {}
        self.dir = trainer.output_dir / "eval"
        self.budget = 0.5 * 60 * int(os.environ.get("DS_FACE_TIMEOUT_MIN", 30))
        self._device = trainer.engine.device
        self._torch = torch
        if not self.enabled:
            return
        error = None
        if self.rank == 0:
            try:  # decoded once, kept for every evaluation
                self.sets = [VerificationSet.load(path, name)
                             for name, path in zip(set_names(self.cfg.sets), self.cfg.sets)]
                self._restore_best(trainer.global_step)
                from ds_face.progress import log
                if self.sets:
                    log.info("evaluation every " + (f"{self.cfg.every_steps} steps" if self.cfg.every_steps else
                             "run end") + ": " + ", ".join(f"{s.name} ({s.pairs} pairs)" for s in self.sets))
                if self.cfg.ijb.root:  # parsed and checked now (every image present), not after hours of training
                    from ds_face.ijb import read_meta
                    self.ijb = read_meta(self.cfg.ijb.root, self.cfg.ijb.target)
                    log.info(f"IJB evaluation at the end of the run: {self.ijb.target} ({self.ijb.images} images, "
                             f"{len(self.ijb.labels)} pairs) from {self.ijb.root}")
            except Exception as err:
                error = err
        self._agree(error)

    def _agree(self, error: Exception | None) -> None:
        """All ranks wait for rank 0; if it failed, every rank raises."""
        torch = self._torch
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=self._device)
            torch.distributed.broadcast(flag, src=0)
            failed = bool(flag.item())
        else:
            failed = error is not None
        if error is not None:
            raise error
        if failed:
            raise RuntimeError("evaluation failed on rank 0 (see its log); stopping this rank too")

    def _restore_best(self, step: int) -> None:
        """After a resume: the best accuracies of evaluations up to ``step`` (from eval/step_*.json)."""
        for path in sorted(self.dir.glob("step_*.json")) if self.dir.is_dir() else []:
            try:
                report = json.loads(path.read_text())
                if report["step"] > step:
                    continue
                for name, r in report["sets"].items():
                    self.best[name] = max(self.best.get(name, 0.0), float(r["accuracy"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue

    def due(self, step: int, last: bool) -> bool:
        """.bin sets: every eval.every_steps and at the last step; IJB: at the last step only."""
        return self.enabled and (last or bool(self.cfg.sets and self.cfg.every_steps
                                              and step % self.cfg.every_steps == 0))

    def __call__(self, step: int, last: bool = False) -> dict | None:
        if not self.due(step, last):
            return None
        error, results = None, None
        if self.rank == 0:
            try:
                results = self._run(step, last)
            except Exception as err:
                error = err
        self._agree(error)
        return results

    def _run(self, step: int, last: bool = False) -> dict:
        from ds_face.progress import log
        model = self.trainer.engine.module
        deadline = time.monotonic() + self.budget
        results = {}
        sets_due = last or bool(self.cfg.every_steps and step % self.cfg.every_steps == 0)
        for vset in self.sets if sets_due else []:
            try:
                r = evaluate(model, vset, self.cfg.batch_size, deadline=deadline)
            except EvalTimeout as err:
                log.warning(f"[{vset.name}][{step}] evaluation skipped ({err}): half of the process-group "
                            f"timeout DS_FACE_TIMEOUT_MIN has passed and the other ranks are waiting")
                continue
            self.best[vset.name] = max(self.best.get(vset.name, 0.0), r["accuracy"])
            r.update(best_accuracy=self.best[vset.name], path=vset.path)
            results[vset.name] = r
            log.info(f"[{vset.name}][{step}]XNorm: {r['xnorm']:f}")
            log.info(f"[{vset.name}][{step}]Accuracy-Flip: {r['accuracy']:1.5f}+-{r['std']:1.5f}")
            log.info(f"[{vset.name}][{step}]Accuracy-Highest: {self.best[vset.name]:1.5f}")
            if self.writer is not None:
                for key in ("accuracy", "std", "threshold", "xnorm", "best_accuracy"):
                    self.writer.add_scalar(f"eval/{vset.name}/{key}", r[key], step)
        ijb = self._run_ijb(model, step, deadline) if last and self.ijb is not None else None
        if self.writer is not None:
            self.writer.flush()
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / f"step_{step}.json",
                          {"step": step, "sets": results, **({"ijb": ijb} if ijb else {})})
        return {**results, **({ijb["target"]: ijb} if ijb else {})}

    def _run_ijb(self, model, step: int, deadline: float) -> dict | None:
        """eval.ijb at the last step, under the same deadline as the .bin sets; also eval/<target>_step_<N>.png."""
        from ds_face import ijb
        from ds_face.progress import log
        meta = self.ijb
        started = time.perf_counter()
        try:
            feats = ijb.image_features(meta, model, self.cfg.batch_size, self._device,
                                       workers=min(8, os.cpu_count() or 1), deadline=deadline)
        except EvalTimeout as err:
            log.warning(f"[{meta.target}][{step}] IJB evaluation skipped ({err}): half of the process-group "
                        f"timeout DS_FACE_TIMEOUT_MIN has passed and the other ranks are waiting")
            return None
        features_seconds = time.perf_counter() - started
        report, curve = ijb.evaluate_features(meta, feats)
        report["seconds"]["features"] = features_seconds
        for key, point in report["tar_at_far"].items():
            log.info(f"[{meta.target}][{step}]TAR@FAR={key}: {point['tar']:1.5f} (at FPR {point['fpr']:.2e})")
            if self.writer is not None:
                self.writer.add_scalar(f"eval/{meta.target}/tar@far={key}", point["tar"], step)
        log.info(f"[{meta.target}][{step}]AUC: {report['auc']:1.5f}")
        if self.writer is not None:
            self.writer.add_scalar(f"eval/{meta.target}/auc", report["auc"], step)
        self.dir.mkdir(parents=True, exist_ok=True)
        ijb.plot_roc(self.dir / f"{meta.target}_step_{step}.png", curve, report, f"{meta.target} step {step}")
        return report


def format_table(results: dict[str, dict]) -> str:
    lines = ["| set | pairs | accuracy | threshold | XNorm | VAL@FAR=1e-3 |",
             "| --- | ---: | --- | ---: | ---: | --- |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['pairs']} | {r['accuracy']:.5f} ± {r['std']:.5f} | {r['threshold']:.3f} "
                     f"| {r['xnorm']:.3f} | {r['val']:.5f} ± {r['val_std']:.5f} @ {r['far']:.5f} |")
    return "\n".join(lines)


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
        write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
