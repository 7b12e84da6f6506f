"""IJB-B / IJB-C 1:1 template verification, as InsightFace releases the sets and arcface_torch's
``eval_ijbc.py`` scores them: the command, ``python -m ds_face.eval ijb`` (the protocol: ``ds_face.ijb``)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ds_face.ijb.features import MAX_PIXELS, image_features, load_features, save_features
from ds_face.ijb.meta import IJBError, read_meta
from ds_face.ijb.scoring import evaluate_features, format_table, plot_roc
from ds_face.runtime.cpus import worker_processes


def main(argv=None) -> int:
    from ds_face.eval.inference import add_model_args
    parser = argparse.ArgumentParser(prog="ds_face.eval ijb", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--root", required=True, help="IJB release directory (loose_crop/, meta/)")
    parser.add_argument("--target", default="IJBC", help="IJBC or IJBB: meta/<target lower case>_*.txt (default IJBC)")
    add_model_args(parser, model_required=False)
    parser.add_argument("--workers", type=int, default=worker_processes(),
                        help="decode+align processes (0: in this process; default min(8, CPUs))")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"largest image decoded, width x height (default {MAX_PIXELS})")
    parser.add_argument("--features", metavar="FEATS.npz",
                        help="image features: written after embedding, or read instead of running the model "
                             "when the file exists and --model is not given")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --features file")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--plot", metavar="ROC.png", help="ROC curve (log-FPR axis) as a PNG")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        check_args(args)
        started = time.perf_counter()
        meta = read_meta(args.root, args.target)
        read_seconds = time.perf_counter() - started
        started = time.perf_counter()
        features = Path(args.features) if args.features else None
        if features is not None and features.exists() and not args.model:
            feats = load_features(features, meta)
            source = str(features)
        else:
            model = _load_model(args)
            feats = image_features(meta, model, args.batch_size, args.device, args.workers, args.max_pixels,
                                   progress=not args.no_progress)
            source = args.model
            if features is not None:
                save_features(features, feats, meta, {"model": args.model, "backbone": args.backbone})
        embed_seconds = time.perf_counter() - started
        report, curve = evaluate_features(meta, feats)
    except IJBError as err:
        print(f"ds_face.eval ijb: error: {err}", file=sys.stderr)
        return 2
    report["seconds"] = {"read_meta": read_seconds, "features": embed_seconds, **report["seconds"]}
    report.update(features_from=source, model=args.model, backbone=args.backbone if args.model else None,
                  features=args.features)
    print(format_table([report]))
    if args.json:
        from ds_face.fileio import write_json_atomic
        write_json_atomic(args.json, report)
    if args.plot:
        plot_roc(args.plot, curve, report)
    return 0


def check_args(args) -> None:
    """Everything checkable before the long part: numbers, output directories, --features vs --model."""
    if args.batch_size < 1:
        raise IJBError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise IJBError(f"--workers must be >= 0, got {args.workers}")
    if args.max_pixels < 1:
        raise IJBError(f"--max-pixels must be >= 1, got {args.max_pixels}")
    for flag, value in (("--json", args.json), ("--plot", args.plot), ("--features", args.features)):
        if value and not Path(value).absolute().parent.is_dir():
            raise IJBError(f"{flag} {value}: directory {Path(value).absolute().parent} does not exist")
        if value and Path(value).is_dir():
            raise IJBError(f"{flag} {value}: is a directory")
    if args.features and not args.features.endswith(".npz"):
        raise IJBError(f"--features {args.features}: must end with .npz")
    exists = bool(args.features) and Path(args.features).exists()
    if not args.model and not exists:
        raise IJBError("--model is required" + (f" (--features {args.features} does not exist yet)"
                                                 if args.features else " (or --features with saved features)"))
    if args.model and exists and not args.overwrite:
        raise IJBError(f"--features {args.features} exists; drop --model to reuse it, or pass --overwrite to "
                       f"recompute and replace it (nothing was written)")


def _load_model(args):
    from ds_face.eval.inference import load_model
    try:
        return load_model(args.model, args.backbone, args.embedding, args.device)
    except ValueError as err:  # the model file's or the backbone's problem (ConfigError, BackboneFileError, ...)
        raise IJBError(str(err)) from None
