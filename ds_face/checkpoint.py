"""Checkpoints that survive a crash and a change of world size.

    <output.dir>/checkpoints/          DeepSpeed's save_dir
      latest                           tag of the newest COMPLETE checkpoint; replaced atomically, last of all
      step_300/
        mp_rank_00_model_states.pt ... DeepSpeed: backbone and its (ZeRO-partitioned) optimizer
        backbone_full.pt               rank 0: the backbone's fp32 masters + optimizer state, gathered
                                       (ds_face.zero_state), for a resume on another world size
        head_rank0_of2.pt ...          one per rank: head slice, head optimizer rows, and the state of the
                                       other components (data identity, position, RNG, BatchNorm buffers)
        ds_face_meta.json              rank 0: step, samples seen, batch layout, classes, backbone, config

The checkpointer is handed the run's stateful parts and knows nothing else of the trainer:

* the DeepSpeed **engine** (backbone + its optimizer): DeepSpeed's own files, plus ``backbone_full.pt``;
* **sharded** parts (the Partial FC head and its optimizer): ``shard_state()`` holds this rank's class
  range; ``load_shards(all ranks' states)`` takes the rows of the new range, on any world size;
* **replicated** parts (the run's position, the data's identity): ``state_dict()``/``load_state_dict()``,
  the same on every rank, read back from rank 0's file;
* **per-rank** parts (RNG streams, BatchNorm running stats): after a resize, new rank r takes old rank
  r mod W_old's, so the run stays deterministic given its seed.

A save first clears the leftovers of an earlier interrupted save of the same step (never the checkpoint
`latest` names), writes everything, agrees across ranks that every write succeeded, and only then moves
`latest`: a crash or a failed write mid-save leaves the previous checkpoint in charge.
"""
from __future__ import annotations

import errno
import json
import logging
import re
import shutil
from pathlib import Path

import torch

from ds_face.dist import any_rank
from ds_face.fileio import write_atomic, write_json_atomic

log = logging.getLogger("ds_face")
LATEST = "latest"
SAVE_DIR = "checkpoints"  # inside output.dir
META = "ds_face_meta.json"
BACKBONE_FULL = "backbone_full.pt"
TAG_PREFIX = "step_"
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


class CheckpointError(ValueError):
    """A checkpoint that is missing, partial, corrupt or does not fit this run; the message names the file."""


HEAD_FILE = re.compile(r"^head_rank(\d+)_of(\d+)\.pt$")
META_KEYS = ("world_size", "num_classes", "embedding_size", "global_step", "epoch", "backbone", "samples_seen",
             "micro_batch", "accumulation")


def head_file(rank: int, world_size: int) -> str:
    return f"head_rank{rank}_of{world_size}.pt"


class Checkpointer:
    """Save and restore one run's state: ``save(step, meta)`` and ``load()``, both collective."""

    def __init__(self, save_dir: str | Path, keep_last: int, engine, sharded: dict, replicated: dict,
                 per_rank: dict, rank: int, world_size: int):
        self.save_dir, self.keep_last = Path(save_dir), keep_last
        self.engine, self.sharded, self.replicated, self.per_rank = engine, sharded, replicated, per_rank
        self.rank, self.world_size = rank, world_size
        self.device = engine.device

    # -- saving --------------------------------------------------------------------------------------------
    def save(self, step: int, meta: dict) -> str:
        """Collective: every rank calls it at the same optimizer step. ``meta``: rank 0's ds_face_meta.json
        (step, layout, config...). Returns the tag."""
        tag = f"{TAG_PREFIX}{step}"
        tag_dir = self.save_dir / tag
        self._refuse_non_finite(tag_dir)
        if self.rank == 0:
            self._clear_leftovers(tag_dir)
        torch.distributed.barrier()  # nobody writes into the directory before it is clean
        from ds_face.zero_state import full_state
        backbone = full_state(self.engine, keep=self.rank == 0)  # collective: gathers every rank's partition
        error = None
        try:
            self.engine.save_checkpoint(str(self.save_dir), tag=tag, save_latest=False)
        except (OSError, RuntimeError) as err:  # its own writes failed (a full disk: RuntimeError from torch.save)
            error = _write_failure(err, tag_dir, "DeepSpeed's files")
            torch.distributed.barrier()  # the other ranks wait in the barrier that ends DeepSpeed's save
        path = tag_dir / head_file(self.rank, self.world_size)
        try:
            if error is None:
                state = {"rank": self.rank, "world_size": self.world_size, **self.sharded["head"].shard_state(),
                         "sharded": {n: part.shard_state() for n, part in self.sharded.items() if n != "head"},
                         "replicated": {n: part.state_dict() for n, part in self.replicated.items()},
                         "per_rank": {n: part.state_dict() for n, part in self.per_rank.items()}}
                write_atomic(path, lambda p: torch.save(state, p))
                if self.rank == 0:
                    if backbone is not None:
                        backbone["engine_counters"] = {n: int(getattr(self.engine, n)) for n in ENGINE_COUNTERS}
                        path = tag_dir / BACKBONE_FULL
                        write_atomic(path, lambda p: torch.save(backbone, p))
                    path = tag_dir / META
                    write_json_atomic(path, {"tag": tag, "global_step": step, "world_size": self.world_size, **meta})
        except (OSError, RuntimeError) as err:
            error = _write_failure(err, path)
        if any_rank(error is not None, self.device):  # every rank learns that the save failed
            if self.rank == 0:  # its files are of no use and may fill the disk: `latest` names an older one
                shutil.rmtree(tag_dir, ignore_errors=True)
            raise CheckpointError(f"{tag_dir}: checkpoint not saved"
                                  + (f" (rank {self.rank}: {error})" if error else " (another rank failed to write)")
                                  + f"; {self.save_dir / LATEST} still names the previous one")
        torch.distributed.barrier()  # every rank's files are in place before `latest` names them
        if self.rank == 0:
            write_atomic(self.save_dir / LATEST, tag.encode())
            self._prune(keep=tag)
        torch.distributed.barrier()
        return tag

    def _refuse_non_finite(self, tag_dir: Path) -> None:
        """Collective. A checkpoint with NaN/inf weights would put `latest` on a run that cannot go on."""
        from ds_face.zero_state import owned_values
        head = self.sharded["head"].weight
        bad = not bool(torch.isfinite(head).all()) or any(
            not bool(torch.isfinite(owned_values(p)).all()) for p in self.engine.module.parameters())
        if any_rank(bad, self.device):
            raise CheckpointError(f"{tag_dir}: not saved: non-finite (NaN/inf) weights in the backbone or head "
                                  f"({'on this rank' if bad else 'on another rank'}); {self.save_dir / LATEST} "
                                  f"still names the previous checkpoint")

    def _clear_leftovers(self, tag_dir: Path) -> None:
        """A directory for this step from a save that never completed (a crash, maybe on another world size):
        start from nothing, so that one checkpoint never mixes two saves' files."""
        latest = self.save_dir / LATEST
        if tag_dir.exists() and not (latest.is_file() and latest.read_text().strip() == tag_dir.name):
            log.warning(f"{tag_dir}: left by an interrupted save; removing it before saving this step again")
            shutil.rmtree(tag_dir)

    def _prune(self, keep: str) -> None:
        tags = checkpoint_tags(self.save_dir)
        for old in tags[:-self.keep_last] if self.keep_last > 0 else []:
            if old != keep:
                shutil.rmtree(self.save_dir / old, ignore_errors=True)

    # -- loading -------------------------------------------------------------------------------------------
    def load(self, cfg) -> dict:
        """Collective: restore the latest complete checkpoint into freshly built components, on any world size.
        Returns its ds_face_meta.json."""
        error = None
        try:  # every file checked before DeepSpeed's collectives, and every rank told if one rank failed
            tag = latest_tag(self.save_dir)
            tag_dir = self.save_dir / tag
            meta = read_meta(tag_dir)
            check_fits(meta, cfg, tag_dir / META)
            old_world = meta["world_size"]
            slices = head_slices(tag_dir, old_world, meta["num_classes"], meta["embedding_size"])
            backbone = self._read_backbone_full(tag_dir, old_world)
            _check_deepspeed_files(tag_dir)  # DeepSpeed unpickles its files with weights_only=False
        except CheckpointError as err:
            error = err
        if any_rank(error is not None, self.device):
            raise error or CheckpointError(f"{self.save_dir}: another rank could not read the checkpoint")
        self._load_backbone(tag, old_world, backbone)
        try:
            self.sharded["head"].load_shards(slices)
            for name, part in self.sharded.items():
                if name != "head":
                    part.load_shards([s["sharded"][name] for s in slices])
            for name, part in self.replicated.items():
                part.load_state_dict(slices[0]["replicated"][name])
            mine = slices[self.rank % old_world]  # after a resize: old rank r mod W_old's streams
            for name, part in self.per_rank.items():
                part.load_state_dict(mine["per_rank"][name])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{tag_dir}: a component's state does not load ({type(err).__name__}: {err})") \
                from None
        log.info(f"resumed from {tag_dir} (step {meta['global_step']}, {meta['samples_seen']} samples seen, "
                 f"saved on {old_world} rank(s), now {self.world_size})")
        return meta

    def _read_backbone_full(self, tag_dir: Path, old_world: int):
        if old_world == self.world_size:
            return None  # DeepSpeed's own files fit
        from ds_face.zero_state import is_partitioned
        if not is_partitioned(self.engine):
            return None  # stage 0 (fp32/fp16): DeepSpeed's files are the same for every world size
        path = tag_dir / BACKBONE_FULL
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; this checkpoint was saved on {old_world} rank(s) by an engine "
                                  f"whose state is not partitioned (ZeRO stage 0?), and this run partitions it: "
                                  f"resume with the ZeRO stage it was saved with")
        state = _load_rank_file(path)
        if not isinstance(state, dict) or not isinstance(state.get("params"), dict):
            raise CheckpointError(f"{path}: corrupt (no per-parameter state)")
        return state

    def _load_backbone(self, tag: str, old_world: int, backbone: dict | None) -> None:
        engine = self.engine
        if backbone is None:
            path, _ = engine.load_checkpoint(str(self.save_dir), tag=tag, load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"{self.save_dir / tag}: DeepSpeed found no model states to load")
            return
        from ds_face.zero_state import load_full_state
        try:
            load_full_state(engine, backbone)
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{self.save_dir / tag / BACKBONE_FULL}: does not fit this backbone ({err})") \
                from None
        counters = backbone.get("engine_counters", {})  # what DeepSpeed's load_checkpoint would restore
        for name in ENGINE_COUNTERS:
            setattr(engine, name, int(counters.get(name, 0)))


def _write_failure(err: Exception, path: Path, what: str = "") -> str:
    """What went wrong writing ``path``, in words: torch.save reports a full disk as 'unexpected pos'."""
    where = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(where).free
    label = f"{path}{f' ({what})' if what else ''}"
    if getattr(err, "errno", None) == errno.ENOSPC or free < 1 << 20:
        return f"{label}: no space left on device ({free} bytes free)"
    return f"{label}: {type(err).__name__}: {err}"


# -- reading: resume and export both use these ---------------------------------------------------------------

def latest_tag(save_dir: str | Path) -> str:
    """The tag `latest` names, checked to be a directory here: the one reader of `latest` (resume, export)."""
    save_dir = Path(save_dir)
    path = save_dir / LATEST
    if not save_dir.is_dir():
        raise CheckpointError(f"{save_dir}: no checkpoint directory to resume from")
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; no complete checkpoint in {save_dir}")
    tag = path.read_text(errors="replace").strip()
    if not tag:
        raise CheckpointError(f"{path} is empty")
    if "/" in tag or tag in (".", "..") or not (save_dir / tag).is_dir():
        tags = ", ".join(checkpoint_tags(save_dir)) or "none"
        raise CheckpointError(f"{path} names tag {tag!r}, but {save_dir / tag} does not exist (tags in "
                              f"{save_dir}: {tags})")
    return tag


def checkpoint_tags(save_dir: Path) -> list[str]:
    """The step_N directories of a save_dir, oldest first."""
    tags = [p for p in save_dir.glob(f"{TAG_PREFIX}*") if p.is_dir() and p.name[len(TAG_PREFIX):].isdigit()]
    return [p.name for p in sorted(tags, key=lambda p: int(p.name[len(TAG_PREFIX):]))]


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
    from ds_face.safe_load import check_meta_counts
    try:  # every count bounded by what the directory holds, before any loop uses one
        check_meta_counts(meta, tag_dir, META)
        for key, low in (("samples_seen", 0), ("micro_batch", 1), ("accumulation", 1)):
            if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < low:
                raise ValueError(f"{path}: '{key}' must be an integer >= {low}, got {meta[key]!r}")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    from ds_face.backbones import BACKBONES
    if meta["backbone"] not in BACKBONES:
        raise CheckpointError(f"{path}: unknown backbone {meta['backbone']!r} (known: {', '.join(BACKBONES)})")
    return meta


def _load_rank_file(path: Path) -> dict:
    from ds_face.safe_load import UnsafeFileError, load_weights_only
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; the checkpoint is incomplete")
    try:
        return load_weights_only(path, mmap=True)
    except UnsafeFileError as err:
        raise CheckpointError(str(err)) from None


def head_slices(tag_dir: Path, world_size: int, num_classes: int, embedding_size: int) -> list[dict]:
    """All ranks' head files of one checkpoint, in rank order: one save's complete set (no file missing, none
    left from a save on another world size), whose [num_local, D] slices tile [0, num_classes) exactly, no gap
    and no overlap. Resume and export both read the head through this; every error names the files."""
    names = sorted(p.name for p in tag_dir.iterdir() if HEAD_FILE.match(p.name))
    if not isinstance(world_size, int) or world_size < 1:
        raise CheckpointError(f"{tag_dir / META}: corrupt (world_size {world_size!r})")
    if world_size > len(names):  # bounded by the files that are there: never loop over a count from a file
        first = next(r for r in range(len(names) + 1) if head_file(r, world_size) not in names)
        raise CheckpointError(f"{tag_dir / head_file(first, world_size)}: not found; the checkpoint is incomplete "
                              f"(missing {head_file(first, world_size)}; {len(names)} head file(s) for world size "
                              f"{world_size})")
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


def _check_deepspeed_files(tag_dir: Path) -> None:
    """Every *.pt of the tag directory through the weights-only loader (DeepSpeed's few types allowed) before
    DeepSpeed's own torch.load(weights_only=False) sees any: a file that would run code is refused, named."""
    from ds_face.safe_load import UnsafeFileError, check_checkpoint_dir
    try:
        check_checkpoint_dir(tag_dir)
    except UnsafeFileError as err:
        raise CheckpointError(str(err)) from None


def check_fits(meta: dict, cfg, meta_path: Path) -> None:
    problems = [f"{key} is {meta[key]} in the checkpoint, {value} in the run config"
                for key, value in (("num_classes", cfg.head.num_classes),
                                   ("embedding_size", cfg.model.embedding_size), ("backbone", cfg.model.backbone))
                if meta.get(key) != value]
    if problems:
        raise CheckpointError(f"{meta_path}: does not fit this run: " + "; ".join(problems))




def plan_resume(save_dir: str | Path, micro_batch: int, accumulation: int, world_size: int,
                keep_global_batch: bool) -> tuple[int, str]:
    """Before any process group starts: the gradient accumulation a resume should use, and the line that says
    what changed. With ``keep_global_batch``, a new world size that divides the saved global batch gets the
    accumulation that keeps it (8 -> 4 ranks: accumulation x 2), so the run's arithmetic is unchanged;
    otherwise the DeepSpeed JSON's accumulation stands and the global batch changes (the LR schedule follows
    samples either way)."""
    tag_dir = Path(save_dir) / latest_tag(save_dir)
    meta = read_meta(tag_dir)
    old = (int(meta["world_size"]), int(meta["micro_batch"]), int(meta["accumulation"]))
    old_global = old[0] * old[1] * old[2]
    if keep_global_batch and old_global % (world_size * micro_batch) == 0:
        accumulation = old_global // (world_size * micro_batch)
    new_global = world_size * micro_batch * accumulation
    if (world_size, micro_batch, accumulation) == old:
        return accumulation, ""
    if new_global == old_global:
        kept = "global batch kept"
    elif keep_global_batch:
        kept = f"global batch changed: {old_global} is not a multiple of {world_size} x {micro_batch}"
    else:
        kept = "global batch changed: checkpoint.keep_global_batch is off"
    return accumulation, (f"resuming {tag_dir.name} with another layout: {old[0]} rank(s) x micro-batch {old[1]} x "
                          f"accumulation {old[2]} = {old_global} -> {world_size} rank(s) x micro-batch {micro_batch} "
                          f"x accumulation {accumulation} = {new_global} ({kept})")
