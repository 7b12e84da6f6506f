"""Start a backbone from a ``model.pt``: ``ds_face.train ... --init-backbone model.pt``.

Accepted files (read weights-only by ``ds_face.checkpoint.safe_load.load_weights_only``, nothing is executed):

* a plain state_dict, as arcface_torch saves it (``torch.save(backbone.module.state_dict())``,
  the model-zoo ``model.pt`` files) and as ``python -m ds_face.export`` writes it;
* a dict holding that state_dict under ``"state_dict"``, ``"model"`` or ``"module"``, or
  ``"state_dict_backbone"`` (arcface_torch's ``checkpoint_gpu_<rank>.pt`` resume files);
* keys with a leading ``module.`` (saved from a DDP wrapper) are stripped.

The keys must match the configured backbone exactly (``load_state_dict(strict=True)``);
on a mismatch the error names the file, the backbone, the embedding sizes and the first
missing / unexpected / wrongly shaped keys. Before anything is allocated from it, every tensor is checked
(``ds_face.checkpoint.tensor_checks.check_state``): float32, float16 or bfloat16 where the model is float32 (float64,
integer, bool, complex refused), int64 counters, dense and alone in its storage (no expanded or shared views),
finite values, BatchNorm variances >= 0; the error names the file and the key. A raw DeepSpeed checkpoint file is refused with
a pointer to ``ds_face.export.cli`` (its weights may be 16-bit or ZeRO-partitioned).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from ds_face.config import ConfigError

WRAPPER_KEYS = ("state_dict", "model", "module", "state_dict_backbone")
SHOW = 5  # keys listed


class BackboneFileError(ConfigError):
    """A --init-backbone file that cannot be used; a ConfigError so ``ds_face.train`` reports it as one."""


def read_backbone_file(path: str | os.PathLike, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict in ``path``, unwrapped and without ``module.`` prefixes (not yet checked)."""
    from ds_face.checkpoint.safe_load import UnsafeFileError, load_weights_only
    path = Path(path)
    try:  # the one weights-only loader: a file that names os.system & co. is refused, naming it
        obj = load_weights_only(path, mmap=mmap)
    except UnsafeFileError as err:
        raise BackboneFileError(str(err)) from None
    if isinstance(obj, dict) and "module" in obj and "buffer_names" in obj and "ds_version" in obj:
        raise BackboneFileError(f"{path} is a DeepSpeed checkpoint file, not a model.pt; export it first: "
                                f"python -m ds_face.export {path.parent} --out model.pt")
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict) and _is_state_dict(obj[key]):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not _is_state_dict(obj):
        what = type(obj).__name__ if not isinstance(obj, dict) else f"dict with keys {sorted(map(str, obj))[:SHOW]}"
        raise BackboneFileError(f"{path}: expected a state_dict (name -> tensor), or one under "
                                f"{'/'.join(repr(k) for k in WRAPPER_KEYS)}; found a {what}")
    if all(key.startswith("module.") for key in obj):
        obj = {key[len("module."):]: value for key, value in obj.items()}
    return dict(obj)


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def architecture(state: dict) -> tuple[list[int], list, int | None, list[str]]:
    """(blocks per stage, stage widths, embedding size, the BACKBONES names with those blocks and widths) of a
    state_dict, read from its key names and shapes; the embedding is None without ``fc.weight``."""
    layers = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        layers.append(max(blocks) + 1 if blocks else 0)
    widths = [tuple(state[f"layer{s}.0.conv1.weight"].shape)[0] if f"layer{s}.0.conv1.weight" in state else None
              for s in range(1, 5)]
    emb = tuple(state["fc.weight"].shape)[0] if "fc.weight" in state else None
    from ds_face.backbones import BACKBONES
    names = [n for n, (blocks, stage_widths) in BACKBONES.items()
             if list(blocks) == layers and list(stage_widths) == widths]
    return layers, widths, emb, names


def describe_backbone(state: dict) -> str:
    """What a state_dict looks like, e.g. 'layers [3, 4, 14, 3], widths [64, 128, 256, 512], embedding 512 (r50)'."""
    layers, widths, emb, names = architecture(state)
    return (f"layers {layers}, widths {widths}, embedding {emb}"
            + (f" (looks like {names[0]})" if names else ""))


def check_state_dict(state: dict, reference: dict, path, backbone: str | None = None,
                     embedding_size: int | None = None) -> None:
    """Raise BackboneFileError unless ``state`` fits ``reference`` (a state_dict, the meta device will do):
    exactly its keys and shapes, its dtypes (float32, or float16/bfloat16 upcast exactly; int64 counters), dense
    tensors each in a storage of its own, finite values (``ds_face.checkpoint.tensor_checks.check_state``). Nothing is
    allocated from ``state`` before this passes."""
    from ds_face.checkpoint.tensor_checks import TensorCheckError, check_state
    target = f"backbone {backbone!r}" if backbone else "the backbone"
    if embedding_size is not None and "fc.weight" in state and "fc.weight" in reference:
        got = tuple(state["fc.weight"].shape)
        if got[0] != embedding_size and got[1:] == tuple(reference["fc.weight"].shape)[1:]:
            raise BackboneFileError(
                f"{path}: embedding size {got[0]} (fc.weight is {list(got)}), but the run config has "
                f"model.embedding_size={embedding_size} for {target}")
    emb = f", embedding {embedding_size}" if embedding_size is not None else ""
    try:
        check_state(state, reference, path, f"{target}{emb}", hint=lambda: f"The file has {describe_backbone(state)}")
    except TensorCheckError as err:
        raise BackboneFileError(str(err)) from None


def load_backbone_file(path: str | os.PathLike, model: nn.Module, backbone: str | None = None,
                       state: dict | None = None) -> nn.Module:
    """Load ``path`` into ``model`` (strict) after ``check_state_dict``; raises BackboneFileError naming file and
    backbone on mismatch. ``state``: ``read_backbone_file(path)`` when the caller has read it already."""
    state = read_backbone_file(path, mmap=True) if state is None else state
    reference = model.state_dict()
    embedding = tuple(reference["fc.weight"].shape)[0] if "fc.weight" in reference else None
    check_state_dict(state, reference, path, backbone, embedding)
    low = sorted({str(v.dtype) for v in state.values() if v.is_floating_point() and v.dtype != torch.float32})
    if low:
        from ds_face.runtime.progress import log
        log.warning(f"{path}: {', '.join(low)} weights, upcast to the model's dtype")
    model.load_state_dict(state, strict=True)
    return model


def check_backbone_file(path: str | os.PathLike, model_cfg) -> None:
    """Check ``path`` against the run config's model without building real weights (a meta-device model).

    Cheap enough for ``ds_face.train.main`` to call before any process group starts.
    """
    from ds_face.backbones import get_backbone
    state = read_backbone_file(path, mmap=True)
    with torch.device("meta"):
        model = get_backbone(model_cfg.backbone, model_cfg.embedding_size)
    check_state_dict(state, model.state_dict(), path, model_cfg.backbone, model_cfg.embedding_size)
