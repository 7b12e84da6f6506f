"""The model side of evaluation, shared by `.bin` verification (eval), IJB (ijb) and embeddings (embed): load a
backbone for inference, and embed images with their horizontal flips (arcface_torch's protocol)."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)  # sklearn.preprocessing.normalize leaves zero rows zero too


class EvalTimeout(RuntimeError):
    pass


def embed_flip(model, images: np.ndarray, batch_size: int = 128, device=None,
               deadline: float | None = None, progress: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, flipped-image embeddings), float32 [N, D] each, un-normalised.

    ``model`` runs in eval mode under ``torch.no_grad`` and is put back in its previous mode. Input dtype
    follows the model's parameters (fp16/bf16 engines). ``deadline`` (time.monotonic()) aborts with
    EvalTimeout between batches. ``progress``: a label for a progress bar on stderr (None: no bar)."""
    import torch
    from tqdm import tqdm

    from ds_face.data.arrow import normalize  # the training input's normalisation: one place for both
    first = next(model.parameters())
    device = torch.device(device) if device is not None else first.device
    dtype = first.dtype if first.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    outs: list[list[np.ndarray]] = [[], []]
    bar = tqdm(total=len(images), unit="img", desc=progress, disable=progress is None, file=sys.stderr,
               mininterval=0.5)
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                if deadline is not None and time.monotonic() > deadline:
                    raise EvalTimeout(f"stopped after {start} of {len(images)} images")
                batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
                x = normalize(batch.to(device))
                for k, inp in enumerate((x, torch.flip(x, dims=[3]))):
                    outs[k].append(model(inp.to(dtype)).float().cpu().numpy())
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return np.concatenate(outs[0]), np.concatenate(outs[1])


def flip_embeddings(model, images: np.ndarray, batch_size: int = 128, device=None,
                    deadline: float | None = None, progress: str | None = None) -> tuple[np.ndarray, float]:
    """(L2-normalised sum of image and flip embeddings [N, D] float32, XNorm)."""
    plain, flipped = embed_flip(model, images, batch_size, device, deadline, progress)
    xnorm = float(np.linalg.norm(np.stack([plain, flipped]), axis=2).mean())  # arcface_torch's XNorm: both sets
    return l2_normalize(plain + flipped).astype(np.float32), xnorm


def weights_architecture(path: str, state: dict | None = None) -> tuple[str, int]:
    """(backbone name, embedding size) of the weights in ``path``, read from their key names and shapes; raises
    BackboneFileError (a ValueError naming the file) when the file is not a backbone's weights or its layout is
    not one of ``ds_face.backbones.BACKBONES``. The names have distinct (blocks, widths), so a match is unique."""
    from ds_face.training.init_backbone import BackboneFileError, architecture, read_backbone_file
    state = read_backbone_file(path, mmap=True) if state is None else state
    layers, widths, embedding, names = architecture(state)
    if not names or embedding is None:
        from ds_face.backbones import BACKBONES
        raise BackboneFileError(f"{path}: cannot tell the backbone from the weights (layers {layers}, widths "
                                f"{widths}, embedding {embedding}; known: {', '.join(BACKBONES)}); pass --backbone "
                                f"and --embedding")
    return names[0], embedding


def load_model(path: str, backbone: str | None = None, embedding: int | None = None, device=None):
    """A backbone built by name with ``path``'s weights (``ds_face.training.init_backbone`` rules), in eval mode.
    ``backbone`` / ``embedding`` None: read from the weights (``weights_architecture``); given, they must fit."""
    import torch

    from ds_face.backbones import get_backbone
    from ds_face.training.init_backbone import BackboneFileError, check_state_dict, load_backbone_file, read_backbone_file
    state = read_backbone_file(path, mmap=True)  # mapped: checked before any of it is read or allocated
    if backbone is None or embedding is None:
        found_backbone, found_embedding = weights_architecture(path, state)
        backbone = backbone or found_backbone
        embedding = embedding or found_embedding
    if isinstance(embedding, bool) or not isinstance(embedding, int) or embedding < 1:
        raise BackboneFileError(f"--embedding must be a positive integer, got {embedding!r}")
    with torch.device("meta"):  # the model's keys, shapes and dtypes, no memory: the file is checked first
        reference = get_backbone(backbone, embedding).state_dict()
    check_state_dict(state, reference, path, backbone, embedding)
    model = get_backbone(backbone, embedding)
    load_backbone_file(path, model, backbone, state=state)
    if device is None:  # the device DeepSpeed's accelerator picks, as in training (cuda, cpu, ...)
        from deepspeed.accelerator import get_accelerator
        device = get_accelerator().device_name()
    from ds_face.config import ConfigError
    try:
        if torch.device(device).type == "meta":
            raise ValueError("the meta device holds no data to compute with")
        return model.to(device).eval()
    except (RuntimeError, AssertionError, ValueError) as err:  # a misspelt or absent device: torch's own words
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--device {device}: cannot put the model there ({first})") from None


class _ModelAndArchitecture(argparse.Action):
    """``--model PATH``, and the ``--backbone`` / ``--embedding`` its weights have where the command line gives
    none (a later ``--backbone`` still wins), so that the namespace, and what a command records from it (eval's
    ``--json``, IJB's report), names the backbone that ran. A file that cannot tell is left to ``load_model``,
    which says why."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.model = value
        if getattr(namespace, "backbone", None) is not None and getattr(namespace, "embedding", None) is not None:
            return
        try:
            backbone, embedding = weights_architecture(value)
        except (ValueError, OSError):
            return
        if getattr(namespace, "backbone", None) is None:
            namespace.backbone = backbone
        if getattr(namespace, "embedding", None) is None:
            namespace.embedding = embedding


def add_model_args(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    from ds_face.backbones import BACKBONES
    parser.add_argument("--model", required=model_required, action=_ModelAndArchitecture,
                        help="model.pt (ds_face.export.cli output or arcface_torch model zoo)")
    parser.add_argument("--backbone", choices=list(BACKBONES),
                        help="default: the one the weights' layers and widths match")
    parser.add_argument("--embedding", type=int, help="embedding size (default: the weights' fc.weight rows)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    parser.add_argument("--device", help="torch device (default: the DeepSpeed accelerator's, e.g. cuda, else cpu)")
