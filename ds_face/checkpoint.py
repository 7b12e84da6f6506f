"""Checkpoints that survive a crash and a change of world size.

    <output.dir>/checkpoints/          DeepSpeed's save_dir
      latest                           tag of the newest COMPLETE checkpoint; replaced atomically, last of all
      step_300/
        mp_rank_00_model_states.pt ... DeepSpeed: backbone and its (ZeRO-partitioned) optimizer
        head_rank0_of2.pt ...          one per rank: head slice, head optimizer rows, LR schedule, data position,
                                       RNG states (DeepSpeed's client_state is written by one rank only)
        ds_face_meta.json              rank 0: step, epoch, world size, classes, embedding size, backbone, config

A save writes everything into the tag directory, agrees across ranks that every write succeeded, and only
then moves `latest`: a crash or a failed write mid-save leaves the previous checkpoint in charge.

Resuming on another world size re-shards the head exactly: the slices are checked to tile [0, num_classes)
(never silently re-initialised, deepinsight/insightface#1758) and every rank takes its new rows, optimizer
state included. The backbone's weights always load; its optimizer state loads when DeepSpeed can map it to
the new world size (ZeRO stage 0: not partitioned), and is otherwise reset with a warning: DeepSpeed 0.19.8's
universal-checkpoint converter handles Adam states only and fails on SGD momentum.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ds_face.dist import any_rank
from ds_face.fileio import write_atomic, write_json_atomic

log = logging.getLogger("ds_face")
LATEST = "latest"
SAVE_DIR = "checkpoints"  # inside output.dir
META = "ds_face_meta.json"
TAG_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint that is missing, partial, corrupt or does not fit this run; the message names the file."""


HEAD_FILE = re.compile(r"^head_rank(\d+)_of(\d+)\.pt$")
META_KEYS = ("world_size", "num_classes", "embedding_size", "global_step", "epoch", "backbone")


def head_file(rank: int, world_size: int) -> str:
    return f"head_rank{rank}_of{world_size}.pt"


# -- saving ------------------------------------------------------------------------------------------------

def rank_state(trainer) -> dict:
    """What this rank alone knows: its head slice and optimizer rows, data position, RNG streams."""
    from deepspeed.accelerator import get_accelerator
    head = trainer.head
    np_state = np.random.get_state()
    return {
        "rank": head.rank, "world_size": head.world_size, "num_classes": head.num_classes,
        "class_start": head.class_start, "num_local": head.num_local, "embedding_size": head.embedding_size,
        "weight": head.weight.detach().cpu(),
        "optimizer": {**trainer.head_optimizer.state_dict(),
                      "state": {k: v.cpu() for k, v in trainer.head_optimizer.state.items()}},
        "sampler": head.sampler.get_state(),
        # DeepSpeed saves rank 0's module; BatchNorm running stats differ per rank (nothing syncs them)
        "buffers": {name: buf.detach().cpu() for name, buf in trainer.engine.module.named_buffers()},
        "lr_scheduler": trainer.engine.lr_scheduler.state_dict(),
        "data": trainer.loader.state_dict(),
        "global_step": trainer.global_step, "epoch": trainer.epoch,
        "rng": {"torch": torch.get_rng_state(), "accelerator": get_accelerator().get_rng_state(),
                "python": random.getstate(),
                "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]]},
    }


def save(trainer, save_dir: str | Path, keep_last: int) -> str:
    """Collective: every rank calls it at the same optimizer step. Returns the tag."""
    save_dir = Path(save_dir)
    tag = f"{TAG_PREFIX}{trainer.global_step}"
    rank, world = trainer.head.rank, trainer.head.world_size
    trainer.engine.save_checkpoint(str(save_dir), tag=tag, save_latest=False)
    error = None
    try:
        state = rank_state(trainer)
        write_atomic(save_dir / tag / head_file(rank, world), lambda p: torch.save(state, p))
        if rank == 0:
            meta = {"tag": tag, "global_step": trainer.global_step, "epoch": trainer.epoch, "world_size": world,
                    "num_classes": trainer.head.num_classes, "embedding_size": trainer.head.embedding_size,
                    "backbone": trainer.cfg.model.backbone, "config": asdict(trainer.cfg)}
            write_json_atomic(save_dir / tag / META, meta)
    except OSError as err:
        error = err
    if any_rank(error is not None, trainer.head.weight.device):  # every rank learns that the save failed
        raise CheckpointError(f"{save_dir / tag}: checkpoint not saved"
                              + (f" (rank {rank}: {error})" if error else " (another rank failed to write)")
                              + f"; {save_dir / LATEST} still names the previous one")
    torch.distributed.barrier()  # every rank's files are in place before `latest` names them
    if rank == 0:
        write_atomic(save_dir / LATEST, tag.encode())
        _prune(save_dir, keep_last, keep=tag)
    torch.distributed.barrier()
    return tag


def _prune(save_dir: Path, keep_last: int, keep: str) -> None:
    tags = sorted((p for p in save_dir.glob(f"{TAG_PREFIX}*") if p.is_dir() and p.name[len(TAG_PREFIX):].isdigit()),
                  key=lambda p: int(p.name[len(TAG_PREFIX):]))
    for old in tags[:-keep_last] if keep_last > 0 else []:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


# -- loading -----------------------------------------------------------------------------------------------

def latest_tag(save_dir: str | Path) -> str:
    path = Path(save_dir) / LATEST
    if not Path(save_dir).is_dir():
        raise CheckpointError(f"{save_dir}: no checkpoint directory to resume from")
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; no complete checkpoint in {save_dir}")
    tag = path.read_text().strip()
    if not tag or "/" in tag or not (Path(save_dir) / tag).is_dir():
        raise CheckpointError(f"{path}: names {tag!r}, which is not a checkpoint directory in {save_dir}")
    return tag


def read_meta(tag_dir: Path) -> dict:
    """rank 0's ds_face_meta.json of a tag directory, checked (resume and export both read it here)."""
    path = tag_dir / META
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; {tag_dir} is not a complete ds_face checkpoint "
                              f"(rank 0 writes it with every save)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt ({err})") from None
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise CheckpointError(f"{path}: corrupt (missing {', '.join(missing)})")
    from ds_face.backbones import BACKBONES
    if meta["backbone"] not in BACKBONES:
        raise CheckpointError(f"{path}: unknown backbone {meta['backbone']!r} (known: {', '.join(BACKBONES)})")
    return meta


def _load_rank_file(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is a corrupt checkpoint
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None


def head_slices(tag_dir: Path, world_size: int, num_classes: int, embedding_size: int) -> list[dict]:
    """All ranks' head files of one checkpoint, in rank order: one save's complete set (no file missing, none
    left from a save on another world size), whose [num_local, D] slices tile [0, num_classes) exactly, no gap
    and no overlap. Resume and export both read the head through this; every error names the files."""
    names = sorted(p.name for p in tag_dir.iterdir() if HEAD_FILE.match(p.name))
    worlds = sorted({int(HEAD_FILE.match(n).group(2)) for n in names} | {world_size})
    if len(worlds) > 1:
        raise CheckpointError(f"{tag_dir}: head files from different world sizes {worlds}: {', '.join(names)} "
                              f"({META} says {world_size})")
    missing = [head_file(r, world_size) for r in range(world_size) if head_file(r, world_size) not in names]
    if missing:
        raise CheckpointError(f"{tag_dir / missing[0]}: not found; the checkpoint is incomplete "
                              f"(missing {', '.join(missing)})")
    extra = [n for n in names if int(HEAD_FILE.match(n).group(1)) >= world_size]
    if extra:
        raise CheckpointError(f"{tag_dir}: unexpected head files {', '.join(extra)} for world size {world_size}")
    files = [tag_dir / head_file(r, world_size) for r in range(world_size)]
    slices = [_load_rank_file(path) for path in files]
    cursor, previous = 0, None
    for rank, (path, part) in enumerate(zip(files, slices)):
        try:
            weight = part["weight"]
            start, count, total = (int(part[k]) for k in ("class_start", "num_local", "num_classes"))
            rows, dim = weight.shape
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: not a head slice (needs a 2-d 'weight' tensor and integer "
                                  f"class_start, num_local, num_classes)") from None
        problem = None
        if int(part.get("rank", rank)) != rank or int(part.get("world_size", world_size)) != world_size:
            problem = f"says rank {part.get('rank')} of {part.get('world_size')}, not what its name says"
        elif rows != count or dim != embedding_size:
            problem = f"weight is {rows}x{dim}, expected {count}x{embedding_size}"
        elif total != num_classes:
            problem = f"was saved for {total} classes, the checkpoint says {num_classes}"
        elif start != cursor:
            where = f"after {previous.name} (which ends at class {cursor})" if previous else "at the start"
            problem = (f"starts at class {start}, expected {cursor}: "
                       f"{'a gap' if start > cursor else 'an overlap'} {where}")
        if problem:
            raise CheckpointError(f"{path}: head slice {problem}; the slices of {tag_dir} do not tile "
                                  f"{num_classes} classes (refusing to re-initialise any)")
        cursor, previous = cursor + rows, path
    if cursor != num_classes:
        raise CheckpointError(f"{tag_dir}: the {world_size} head slices hold {cursor} classes, expected "
                              f"{num_classes}: they end at class {cursor} ({previous.name}) "
                              f"(refusing to re-initialise any)")
    return slices


def _rows(slices: list[dict], get, start: int, count: int) -> torch.Tensor:
    """Rows [start, start + count) of the class-indexed tensor `get(slice)` concatenated over the slices."""
    parts = []
    for part in slices:
        lo = max(start, part["class_start"])
        hi = min(start + count, part["class_start"] + part["num_local"])
        if lo < hi:
            parts.append(get(part)[lo - part["class_start"]:hi - part["class_start"]])
    return torch.cat(parts)


def check_fits(meta: dict, cfg, meta_path: Path) -> None:
    problems = [f"{key} is {meta[key]} in the checkpoint, {value} in the run config"
                for key, value in (("num_classes", cfg.head.num_classes),
                                   ("embedding_size", cfg.model.embedding_size), ("backbone", cfg.model.backbone))
                if meta.get(key) != value]
    if problems:
        raise CheckpointError(f"{meta_path}: does not fit this run: " + "; ".join(problems))


def load(trainer, save_dir: str | Path) -> str:
    """Collective: restore the latest complete checkpoint into a freshly built Trainer. Returns the tag."""
    save_dir = Path(save_dir)
    head, opt = trainer.head, trainer.head_optimizer
    error = None
    try:  # every file checked before DeepSpeed's collectives, and every rank told if one rank failed
        tag = latest_tag(save_dir)
        tag_dir = save_dir / tag
        meta = read_meta(tag_dir)
        check_fits(meta, trainer.cfg, tag_dir / META)
        old_world = meta["world_size"]
        slices = head_slices(tag_dir, old_world, meta["num_classes"], meta["embedding_size"])
    except CheckpointError as err:
        error = err
    if any_rank(error is not None, head.weight.device):
        raise error or CheckpointError(f"{save_dir}: another rank could not read the checkpoint")
    same_world = old_world == head.world_size

    _load_backbone(trainer.engine, save_dir, tag, same_world)

    mine = slices[head.rank] if same_world else slices[0]
    with torch.no_grad():
        head.weight.copy_(_rows(slices, lambda s: s["weight"], head.class_start, head.num_local))
        for key, value in opt.state.items():
            value.copy_(_rows(slices, lambda s: s["optimizer"]["state"][key], head.class_start, head.num_local))
    opt.steps_applied, opt.steps_skipped = mine["optimizer"]["steps_applied"], mine["optimizer"]["steps_skipped"]
    trainer.engine.lr_scheduler.load_state_dict(mine["lr_scheduler"])
    trainer.loader.load_state_dict(mine["data"])
    trainer.global_step, trainer.epoch = meta["global_step"], meta["epoch"]
    if same_world:  # the run continues exactly: same sampling and random streams as without the interruption
        from deepspeed.accelerator import get_accelerator
        head.sampler.set_state(mine["sampler"])
        with torch.no_grad():
            for name, buf in trainer.engine.module.named_buffers():
                buf.copy_(mine["buffers"][name])
        rng = mine["rng"]
        torch.set_rng_state(rng["torch"])
        get_accelerator().set_rng_state(rng["accelerator"])
        random.setstate(_tuples(rng["python"]))
        np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy(), *rng["numpy"][2:]))
    log.info(f"resumed from {tag_dir} (step {trainer.global_step}, epoch {trainer.epoch}, saved on {old_world} "
             f"rank(s), now {head.world_size})")
    return tag


def _tuples(value):
    """random.getstate() comes back from torch.load with lists where it had tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _load_backbone(engine, save_dir: Path, tag: str, same_world: bool) -> None:
    kwargs = dict(load_module_strict=True, load_lr_scheduler_states=False)
    if same_world or engine.zero_optimization_stage() == 0:  # stage 0's optimizer state is not partitioned
        path, _ = engine.load_checkpoint(str(save_dir), tag=tag, load_optimizer_states=True, **kwargs)
    else:
        log.warning(f"{save_dir / tag}: saved on another world size with ZeRO stage "
                    f"{engine.zero_optimization_stage()}; loading the backbone weights only: its optimizer state "
                    f"(momentum) starts from zero. The head is re-sharded with its optimizer state.")
        path, _ = engine.load_checkpoint(str(save_dir), tag=tag, load_optimizer_states=False, load_module_only=True,
                                         **kwargs)
    if path is None:
        raise CheckpointError(f"{save_dir / tag}: DeepSpeed found no model states to load")
