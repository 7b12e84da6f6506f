"""Export a checkpoint's backbone as an arcface_torch ``model.pt`` (and ONNX, and the full head).

``python -m ds_face.export <checkpoints or step_N dir> --out model.pt [--onnx ...] [--head ...]``; usage,
outputs and exit codes: README.md, "Export". The weights come from ``ds_face.export_weights`` (DeepSpeed's
checkpoint, any ZeRO stage and precision, back to plain fp32 tensors), the ONNX model from
``ds_face.export_onnx``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from ds_face.export_onnx import ONNX_OPSET, OnnxMismatch, export_onnx
from ds_face.export_weights import ExportError, gather_head, load_backbone_state


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
        if path.exists() and not args.overwrite:
            raise ExportError(f"{flag} {path} exists; pass --overwrite to replace it")
    return outputs


def _staging(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    staged: dict[Path, Path] = {}
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

        if "--out" in outputs:
            staged[outputs["--out"]] = tmp = _staging(outputs["--out"])
            torch.save(state, tmp)
        if head is not None:
            staged[outputs["--head"]] = tmp = _staging(outputs["--head"])
            torch.save({"weight": head}, tmp)
        if "--onnx" in outputs:
            staged[outputs["--onnx"]] = tmp = _staging(outputs["--onnx"])
            results = export_onnx(state, meta, tmp, atol=args.atol)
            print("ONNX check (onnxruntime vs torch, max abs diff): "
                  + ", ".join(f"batch {b}: {d:.3g}" for b, d in results) + f" (tolerance {args.atol:g})")
        for final, tmp in staged.items():
            os.replace(tmp, final)
        staged.clear()
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
        print(f"ds_face.export: ONNX check failed: {err}; nothing written", file=sys.stderr)
        return 1
    finally:
        for tmp in staged.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


if __name__ == "__main__":
    sys.exit(main())
