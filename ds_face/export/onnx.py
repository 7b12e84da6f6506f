"""The backbone as ONNX (torch's dynamo exporter, dynamic batch axis), checked against torch with onnxruntime."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings

from ds_face.export.weights import ExportError, reference_backbone

ONNX_OPSET = 18  # the lowest opset the dynamo exporter implements natively in torch 2.13
ONNX_CHECK_BATCHES = (4, 3)  # two sizes: proves the batch axis is really dynamic
IMAGE = (3, 112, 112)


class OnnxMismatch(Exception):
    """onnxruntime and torch disagree by more than the tolerance (exit code 1)."""


def export_onnx(state: dict, meta: dict, path: str | os.PathLike, atol: float = 1e-4,
                batches=ONNX_CHECK_BATCHES, seed: int = 0) -> list[tuple[int, float]]:
    """Export the backbone to ``path`` and compare onnxruntime with torch; returns [(batch, max abs diff)].

    Raises OnnxMismatch (after writing ``path``) if a difference exceeds ``atol``.
    """
    import torch
    try:
        import numpy as np
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        raise ExportError(f"--onnx needs onnx, onnxscript and onnxruntime (pip install 'ds_face[onnx]', or make setup): "
                          f"{err}") from None
    model = reference_backbone(meta, device="cpu")
    model.load_state_dict(state, strict=True)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    example = torch.rand(2, *IMAGE, generator=gen) * 2 - 1  # batch 2: torch.export would specialise a batch of 1
    batch = torch.export.Dim("batch", min=1, max=65536)
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [log.level for log in quiet]
    try:
        for log in quiet:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), input_names=["input"], output_names=["embedding"],
                                        dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET, dynamo=True,
                                        verbose=False)
            program.save(str(path), external_data=False)
    except Exception as err:
        raise ExportError(f"torch.onnx.export failed for backbone {meta['backbone']}: {type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    results = []
    for size in batches:
        images = torch.rand(size, *IMAGE, generator=gen) * 2 - 1
        with torch.no_grad():
            expected = model(images).numpy()
        got = session.run(["embedding"], {"input": images.numpy()})[0]
        if got.shape != expected.shape:
            raise OnnxMismatch(f"batch {size}: onnxruntime gave shape {got.shape}, torch {expected.shape}")
        results.append((size, float(np.abs(got - expected).max())))
    worst = max(diff for _, diff in results)
    if not worst <= atol:
        raise OnnxMismatch(f"onnxruntime differs from torch by {worst:.3g} (> --atol {atol:g}): "
                           + ", ".join(f"batch {b}: {d:.3g}" for b, d in results))
    return results
