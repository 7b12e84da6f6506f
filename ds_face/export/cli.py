"""Export a checkpoint's backbone as an arcface_torch ``model.pt`` (and ONNX, and the full head).

``python -m ds_face.export <checkpoints or step_N dir> --out model.pt [--onnx ...] [--head ...]``; usage,
outputs and exit codes: README.md, "Export". The weights come from ``ds_face.export.weights`` (DeepSpeed's
checkpoint, any ZeRO stage and precision, back to plain fp32 tensors), the ONNX model from
``ds_face.export.onnx``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ds_face.export.onnx import ONNX_OPSET, OnnxMismatch, export_onnx
from ds_face.export.weights import ExportError, gather_head, load_backbone_state


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ds_face.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="<output.dir>/checkpoints (uses 'latest' or --tag) or a tag directory")
    parser.add_argument("--out", help="write the backbone's fp32 state_dict here (arcface_torch model.pt)")
    parser.add_argument("--onnx", help="also write an ONNX model here, checked with onnxruntime")
    parser.add_argument("--head", help="also write the full Partial FC weight {'weight': [num_classes, D]} here")
    parser.add_argument("--tag", help="checkpoint tag (e.g. step_300) when <checkpoint> is the save_dir")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="max abs difference allowed between onnxruntime and torch (default 1e-4)")
    return parser.parse_args(argv)


def _outputs(args) -> dict[str, Path]:
    """The files to write, checked before any work: distinct, not a directory, not there already (unless
    --overwrite: nothing the user had is replaced unasked), in a directory that exists (or can be made) and
    can be written."""
    outputs = {flag: Path(value) for flag, value in (("--out", args.out), ("--head", args.head),
                                                      ("--onnx", args.onnx)) if value}
    if not outputs:
        raise ExportError("nothing to do: give --out (and/or --onnx, --head)")
    resolved = [p.resolve() for p in outputs.values()]
    if len(set(resolved)) != len(resolved):
        raise ExportError("--out, --head and --onnx must be different files")
    for flag, path in outputs.items():
        if path.is_dir():
            raise ExportError(f"{flag} {path} is a directory")
        if os.path.lexists(path) and not args.overwrite:
            raise ExportError(f"{flag} {path} exists; pass --overwrite to replace it")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ExportError(f"{flag} {path}: cannot create its directory {path.parent} "
                              f"({err.strerror or err})") from None
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise ExportError(f"{flag} {path}: the directory {path.parent} is not writable (nothing was written)")
    return outputs


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from ds_face.fileio import AtomicFile
    asides: dict[str, AtomicFile] = {}  # each output written aside (fresh, exclusive, no link followed), then renamed
    writing = None
    try:
        outputs = _outputs(args)
        # The head first: its checks are cheap, rebuilding ZeRO-partitioned weights may not be.
        head = gather_head(args.checkpoint, args.tag) if "--head" in outputs else None
        state, meta = load_backbone_state(args.checkpoint, args.tag)
        src = meta["source"]
        print(f"checkpoint {src['tag_dir']}: backbone {meta['backbone']}, embedding {meta['embedding_size']}, "
              f"ZeRO stage {src['zero_stage']}, {src['precision']}, {src['world_size']} rank(s)"
              + (f", global step {meta['global_step']}" if "global_step" in meta else ""))
        print(f"weights: {src['weights']}")

        for flag, obj in (("--out", state), ("--head", None if head is None else {"weight": head})):
            if flag in outputs and obj is not None:
                writing = outputs[flag]
                asides[flag] = AtomicFile(writing)
                torch.save(obj, asides[flag].file)
        if "--onnx" in outputs:
            writing = outputs["--onnx"]
            asides["--onnx"] = aside = AtomicFile(writing)
            results = export_onnx(state, meta, aside.path.parent / aside.temp, atol=args.atol)
            print("ONNX check (onnxruntime vs torch, max abs diff): "
                  + ", ".join(f"batch {b}: {d:.3g}" for b, d in results) + f" (tolerance {args.atol:g})")
        for flag, aside in asides.items():
            writing = aside.path
            if os.path.lexists(aside.path) and not args.overwrite:  # appeared while we worked: still not ours
                raise ExportError(f"{flag} {aside.path} appeared meanwhile; kept (pass --overwrite to replace it)")
            aside.commit()
        params = sum(v.numel() for k, v in state.items() if v.is_floating_point()
                     and not k.endswith(("running_mean", "running_var")))
        if "--out" in outputs:
            print(f"wrote {outputs['--out']}: {len(state)} tensors, {params / 1e6:.2f}M parameters, fp32")
        if head is not None:
            print(f"wrote {outputs['--head']}: weight {list(head.shape)}")
        if "--onnx" in outputs:
            print(f"wrote {outputs['--onnx']}: opset {ONNX_OPSET}, input 'input' [batch, 3, 112, 112], "
                  f"output 'embedding' [batch, {meta['embedding_size']}]")
        return 0
    except ExportError as err:
        print(f"ds_face.export: error: {err}", file=sys.stderr)
        return 2
    except OnnxMismatch as err:
        print(f"ds_face.export.cli: ONNX check failed: {err}; nothing written", file=sys.stderr)
        return 1
    except (OSError, RuntimeError) as err:  # a write failed (read-only, disk full, ...): torch.save says RuntimeError
        if writing is None:
            raise
        text = (getattr(err, "strerror", None) or str(err).strip().splitlines()[0]) if str(err).strip() else \
            type(err).__name__
        done = [str(a.path) for a in asides.values() if a.done]
        print(f"ds_face.export: error: cannot write {writing}: {text}"
              + (f" (already written: {', '.join(done)})" if done else "; nothing was written"), file=sys.stderr)
        return 2
    finally:
        for aside in asides.values():
            if not aside.done:
                aside.discard()


if __name__ == "__main__":
    sys.exit(main())
