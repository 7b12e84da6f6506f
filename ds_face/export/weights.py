"""A checkpoint's backbone as plain fp32 tensors with arcface_torch's names (any ZeRO stage and precision), and
its full Partial FC head gathered from every rank's shard: what ``ds_face.export.cli`` writes, so that models
trained here load where arcface_torch's do. Every torch file is read weights-only (``ds_face.checkpoint.safe_load``) before
DeepSpeed's ``zero_to_fp32``, which unpickles without that guard, sees it.
"""
from __future__ import annotations

import contextlib
import os
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
# torch, DeepSpeed and ds_face.checkpoint.files (torch) are imported by the functions that use them, so that
# --help answers at once.

MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


class ExportError(Exception):
    """Bad input: reported as ``error: ...`` with exit code 2."""


# -- finding the checkpoint -------------------------------------------------------------------------

def _looks_like_tag_dir(path: Path) -> bool:
    from ds_face.checkpoint.files import META
    return (path / META).exists() or any(path.glob("*_model_states.pt")) or any(path.glob("head_rank*_of*.pt"))


def _tags_in(save_dir: Path) -> list[str]:
    """The save_dir's tags (``checkpoint_tags``, oldest first) that hold checkpoint files."""
    from ds_face.checkpoint.files import checkpoint_tags
    return [tag for tag in checkpoint_tags(save_dir) if _looks_like_tag_dir(save_dir / tag)]


def resolve_tag_dir(ckpt_dir: str | os.PathLike, tag: str | None = None) -> Path:
    """The tag directory meant by ``ckpt_dir`` (a save_dir or a tag directory) and ``tag``."""
    from ds_face.checkpoint.files import LATEST
    path = Path(ckpt_dir)
    if not path.exists():
        raise ExportError(f"{path}: no such directory")
    if not path.is_dir():
        raise ExportError(f"{path} is a file; give the checkpoint directory (<output.dir>/checkpoints "
                          f"or one of its tag directories)")
    if tag is not None:
        if not tag or "/" in tag or os.sep in tag or tag in (".", ".."):
            raise ExportError(f"--tag {tag!r} is not a tag name (e.g. step_300)")
        if _looks_like_tag_dir(path):
            if path.name == tag:
                return path
            raise ExportError(f"{path} is a tag directory ({path.name}); --tag {tag} does not apply to it")
        if not (path / tag).is_dir():
            available = ", ".join(_tags_in(path)) or "none"
            raise ExportError(f"tag {tag!r} not found: no directory {path / tag} (tags in {path}: {available})")
        return path / tag
    if _looks_like_tag_dir(path):
        return path
    latest = path / LATEST
    if latest.is_file():
        from ds_face.checkpoint.files import CheckpointError, latest_tag
        try:  # the one reader of `latest`, resume's
            return path / latest_tag(path)
        except CheckpointError as err:
            raise ExportError(str(err)) from None
    tags = _tags_in(path)
    if tags:
        raise ExportError(f"{latest} is missing; pass --tag (tags in {path}: {', '.join(tags)})")
    raise ExportError(f"{path} is not a checkpoint directory: no {latest.name} file, no tag directories, "
                      f"no {MODEL_STATES}")


def read_meta(tag_dir: Path) -> dict:
    """ds_face_meta.json, checked where resume checks it (ds_face.checkpoint.files), its counts bounded by the files."""
    from ds_face.checkpoint.files import META, CheckpointError
    from ds_face.checkpoint.files import read_meta as checked
    from ds_face.checkpoint.safe_load import check_meta_counts
    try:
        meta = checked(tag_dir)
        check_meta_counts(meta, tag_dir, META)
        return meta
    except (CheckpointError, ValueError) as err:
        raise ExportError(str(err)) from None


def check_files(tag_dir: Path) -> None:
    """Every torch file of the tag directory read weights-only, before DeepSpeed unpickles any of them."""
    from ds_face.checkpoint.safe_load import UnsafeFileError, check_checkpoint_dir
    try:
        check_checkpoint_dir(tag_dir)
    except UnsafeFileError as err:
        raise ExportError(str(err)) from None


def _check_torch_file(path: Path) -> None:
    if not path.is_file():
        raise ExportError(f"{path} is missing")
    if not zipfile.is_zipfile(path):
        raise ExportError(f"{path} is not a readable torch file (truncated or corrupt?)")


def _load(path: Path):
    from ds_face.checkpoint.safe_load import UnsafeFileError, load_weights_only
    _check_torch_file(path)
    try:
        return load_weights_only(path)
    except UnsafeFileError as err:
        raise ExportError(str(err)) from None


# -- the backbone -----------------------------------------------------------------------------------

def reference_backbone(meta: dict, device: str = "meta") -> torch.nn.Module:
    """The backbone the checkpoint was trained with; on the meta device it costs nothing."""
    import torch
    from ds_face.backbones import get_backbone
    with torch.device(device):
        return get_backbone(meta["backbone"], int(meta["embedding_size"]))


def load_backbone_state(ckpt_dir: str | os.PathLike, tag: str | None = None) -> tuple[dict, dict]:
    """The backbone's fp32 state_dict (arcface_torch keys and order) and the checkpoint's meta.

    ``meta`` is ``ds_face_meta.json`` plus ``meta["source"]``: where the weights came from.
    """
    from ds_face.checkpoint.files import META
    tag_dir = resolve_tag_dir(ckpt_dir, tag)
    states_file = tag_dir / MODEL_STATES
    if not states_file.exists() and (tag_dir / ZERO3_MODEL_STATES.format(rank=0)).exists():
        states_file = tag_dir / ZERO3_MODEL_STATES.format(rank=0)
    if not states_file.exists():
        raise ExportError(f"{states_file} is missing (ZeRO-3: {ZERO3_MODEL_STATES.format(rank=0)}): "
                          f"{tag_dir} is not a complete DeepSpeed checkpoint")
    check_files(tag_dir)  # before zero_to_fp32 (weights_only=False) sees any file
    states = _load(states_file)
    if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
        raise ExportError(f"{states_file} is not a DeepSpeed model-states file (no 'module' entry)")
    meta = read_meta(tag_dir)

    ds_config = states.get("ds_config") or {}
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    world_size = int(states.get("dp_world_size") or 1)
    if "world_size" in meta and int(meta["world_size"]) != world_size:
        raise ExportError(f"{tag_dir / META} says world size {meta['world_size']} but {states_file} was saved "
                          f"by {world_size} data-parallel ranks: files from different runs?")
    reference = reference_backbone(meta)
    ref_state = reference.state_dict()
    frozen = {name for name, p in reference.named_parameters() if not p.requires_grad}
    module = states["module"]
    optim_files = sorted(tag_dir.glob("*_optim_states.pt"))

    if stage == 0 and not optim_files:
        state, how = _stage0_fp32(module, states.get("optimizer"), reference, states_file)
    else:
        state = _zero_fp32(tag_dir, stage, world_size, optim_files)
        how = f"fp32 master weights rebuilt by deepspeed.utils.zero_to_fp32 from {len(optim_files)} ZeRO shard(s)"
        # Frozen parameters (features.weight) are not in the optimizer; DeepSpeed's converter
        # drops them for some layouts (bf16 + ZeRO-1). They never change: take the module's copy.
        for name in ref_state:
            if name not in state and name in frozen and name in module \
                    and tuple(module[name].shape) == tuple(ref_state[name].shape):
                state[name] = module[name]

    _check_against(state, ref_state, meta, tag_dir)
    out = {}
    for name in ref_state:  # arcface_torch's key order, fp32, own storage
        value = state[name].detach().to("cpu")
        out[name] = (value.float() if value.is_floating_point() else value).contiguous().clone()
    meta = dict(meta)
    meta["source"] = {"tag_dir": str(tag_dir), "tag": tag_dir.name, "zero_stage": stage,
                      "world_size": world_size, "weights": how,
                      "precision": _precision(ds_config)}
    return out, meta


def _precision(ds_config: dict) -> str:
    if (ds_config.get("fp16") or {}).get("enabled"):
        return "fp16"
    if (ds_config.get("bf16") or ds_config.get("bfloat16") or {}).get("enabled"):
        return "bf16"
    return "fp32"


def _stage0_fp32(module: dict, optimizer, reference, states_file: Path) -> tuple[dict, str]:
    """ZeRO stage 0: the module itself if fp32, else the fp16/bf16 optimizer's fp32 master copies."""
    import torch

    from ds_face.checkpoint.tensor_checks import dtype_problem
    for name, ref in reference.state_dict().items():  # int8, bool, complex, float64: not a precision we export
        problem = name in module and isinstance(module[name], torch.Tensor) and dtype_problem(module[name].dtype,
                                                                                              ref.dtype)
        if problem:
            raise ExportError(f"{states_file}: module.{name} is {problem}")
    trainable = [name for name, p in reference.named_parameters() if p.requires_grad]
    low = [n for n in trainable if n in module and module[n].dtype != torch.float32]
    if not low:
        return dict(module), f"the fp32 module in {states_file.name} (ZeRO stage 0)"
    # DeepSpeed's FP16_Optimizer / FP16_UnfusedOptimizer (used for fp16 and bf16 at stage 0)
    # keep one fp32 master per trainable parameter, in the order the optimizer got them:
    # ds_face.train passes backbone.parameters() with requires_grad, in module order.
    masters = None
    if isinstance(optimizer, dict):
        if isinstance(optimizer.get("fp32_groups"), list):
            masters = [t for group in optimizer["fp32_groups"] for t in group]
        elif isinstance(optimizer.get("fp32_groups_flat"), list):
            flat = torch.cat([t.reshape(-1) for t in optimizer["fp32_groups_flat"]])
            sizes = [module[n].numel() for n in trainable if n in module]
            if flat.numel() == sum(sizes):
                masters = list(flat.split(sizes))
    problem = None
    if masters is None:
        problem = "no fp32 master weights (optimizer 'fp32_groups') in it"
    elif len(masters) != len(trainable):
        problem = f"{len(masters)} fp32 master tensors for {len(trainable)} trainable parameters"
    else:
        for name, master in zip(trainable, masters):
            if name not in module or master.numel() != module[name].numel() \
                    or not torch.equal(master.reshape(module[name].shape).to(module[name].dtype), module[name]):
                problem = f"the fp32 master for {name} does not round to the module's {module[name].dtype} copy"
                break
    if problem:
        raise ExportError(f"{states_file}: the module is {module[low[0]].dtype} and {problem}; "
                          f"refusing to export 16-bit weights as fp32")
    state = dict(module)
    for name, master in zip(trainable, masters):
        state[name] = master.reshape(module[name].shape)
    return state, f"the fp32 master copies in {states_file.name}'s optimizer state (ZeRO stage 0, 16-bit module)"


def _zero_fp32(tag_dir: Path, stage: int, world_size: int, optim_files: list[Path]) -> dict:
    if len(optim_files) != world_size:
        names = ", ".join(p.name for p in optim_files) or "none"
        raise ExportError(f"{tag_dir}: expected {world_size} ZeRO optimizer shards (*_optim_states.pt, one per "
                          f"rank), found {len(optim_files)}: {names}")
    for path in optim_files:
        _check_torch_file(path)
    if stage == 3:
        for rank in range(world_size):
            _check_torch_file(tag_dir / ZERO3_MODEL_STATES.format(rank=rank))
    # DeepSpeed prints progress (and its accelerator banner on import) to stdout: keep ours clean.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            # zero_to_fp32 loads the shards with weights_only=False: load_backbone_state ran check_files first.
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name))
        except Exception as err:
            raise ExportError(f"{tag_dir}: DeepSpeed could not rebuild the fp32 weights: "
                              f"{type(err).__name__}: {err}") from None


def _check_against(state: dict, ref_state: dict, meta: dict, tag_dir: Path) -> None:
    """The weights about to be written: the backbone's keys, shapes and dtypes, dense, finite
    (``ds_face.checkpoint.tensor_checks.check_state``; views of DeepSpeed's flat buffers are fine, they are cloned)."""
    from ds_face.checkpoint.files import META
    from ds_face.checkpoint.tensor_checks import TensorCheckError, check_state
    try:
        check_state(state, ref_state, tag_dir, f"backbone {meta['backbone']!r} with embedding "
                    f"{meta['embedding_size']} ({META})", own_storage=False)
    except TensorCheckError as err:
        raise ExportError(str(err)) from None


# -- the head ---------------------------------------------------------------------------------------

def gather_head(ckpt_dir: str | os.PathLike, tag: str | None = None, meta: dict | None = None) -> torch.Tensor:
    """The full [num_classes, D] fp32 centre matrix from all ranks' ``head_rank{r}_of{W}.pt``.

    Fails, naming the files, unless the shards are one checkpoint's complete set and their class ranges
    tile ``[0, num_classes)`` exactly (``ds_face.checkpoint.files.head_slices``, the check resume makes).
    """
    import torch
    from ds_face.checkpoint.files import CheckpointError, head_slices
    tag_dir = resolve_tag_dir(ckpt_dir, tag)
    meta = meta if meta is not None else read_meta(tag_dir)
    check_files(tag_dir)
    try:
        files = head_slices(tag_dir, int(meta["world_size"]), int(meta["num_classes"]), int(meta["embedding_size"]))
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    return torch.cat([f["sharded"]["head"]["weight"].detach().float() for f in files]).contiguous()
