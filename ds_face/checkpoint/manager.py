"""The checkpoint manager: when to save, the save itself, and the resume, for the stateful parts it is handed.

    manager = CheckpointManager(output_dir / SAVE_DIR, engine, sharded={...}, replicated={...}, per_rank={...},
                                position=position, run=run_meta, policy=cfg.checkpoint, rank=r, world_size=W)
    manager.load()                      # --resume: the latest complete checkpoint, on any world size
    manager.maybe_save(epoch_ended)     # after each optimizer step: saves when the policy says so
    manager.save()                      # at the run's end (nothing is written twice for one step)

It knows nothing else of the trainer. The parts, each by a declared protocol:

* the DeepSpeed **engine** (backbone + its optimizer): DeepSpeed's own files, plus ``backbone_full.pt``;
* **sharded** parts (``Sharded``: the Partial FC head and its optimizer): ``shard_state()`` holds this rank's
  class range; ``load_shards(all ranks' states)`` takes the rows of the new range, on any world size;
* **replicated** parts (``Stateful``: the data's identity): the same on every rank, read back from rank 0's file;
  the run's **position** (step, samples seen) is one of them, and the meta is made from it;
* **per-rank** parts (``Stateful``: RNG streams, BatchNorm running stats): after a resize, new rank r takes old
  rank r mod W_old's, so the run stays deterministic given its seed.

A save first clears the leftovers of an earlier interrupted save of the same step (never the checkpoint
`latest` names), writes everything, agrees across ranks that every write succeeded, and only then moves
`latest`: a crash or a failed write mid-save leaves the previous checkpoint in charge. Nothing is written through
a link: DeepSpeed saves into ``.saving/step_N``, made fresh here and renamed into place; ds_face's own files go
through ds_face.fileio. What the files hold and how they are read back: ds_face.checkpoint.files.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Protocol

import torch

from ds_face.checkpoint.files import (
    BACKBONE_FULL, ENGINE_COUNTERS, LATEST, META, STAGING, TAG_PREFIX, CheckpointError, check_deepspeed_files,
    check_position, check_resume, checkpoint_tags, engine_kind, head_file, head_slices, latest_tag, load_rank_file,
    make_meta,
)
from ds_face.checkpoint.stateful import Position
from ds_face.fileio import WriteError, fresh_dir, remove_entry, write_atomic, write_json_atomic
from ds_face.runtime.dist import any_rank

log = logging.getLogger("ds_face")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class Sharded(Protocol):
    """A part whose rows are split across ranks by class (``class_start``, ``num_local`` of ``num_classes`` in
    its state): each rank saves its own rows, and a load on any world size takes the rows of its new range."""
    def shard_state(self) -> dict: ...
    def load_shards(self, states: list[dict]) -> None: ...


class CheckpointManager:
    """Save and restore one run's state. ``maybe_save``, ``save`` and ``load`` are collective: every rank calls
    them at the same optimizer step.

    ``run``: what the meta says of the run besides its position (``ds_face.checkpoint.files.make_meta``), and
    what a checkpoint must match to be resumed (classes, embedding, backbone, optimizer). ``policy``: the run
    YAML's ``checkpoint`` block (``every_steps``, ``every_minutes``, ``keep_last``)."""

    def __init__(self, save_dir: str | Path, engine, *, sharded: dict[str, Sharded], replicated: dict[str, Stateful],
                 per_rank: dict[str, Stateful], position: Position, run: dict, policy, rank: int, world_size: int):
        self.save_dir = Path(save_dir)
        self.engine, self.sharded, self.per_rank, self.position = engine, sharded, per_rank, position
        self.replicated = {"position": position, **replicated}
        self.run, self.policy = run, policy
        self.rank, self.world_size = rank, world_size
        self.device = engine.device
        self._saved_step: int | None = None  # the step of the newest checkpoint: no tag is written twice
        self._last_save = time.monotonic()  # checkpoint.every_minutes counts from here

    # -- when ----------------------------------------------------------------------------------------------
    def due(self, epoch_ended: bool) -> bool:
        """Collective: every ``every_steps`` steps, at each epoch's end, and once ``every_minutes`` have passed
        since the last save (on any rank's clock: the ranks agree, so that all of them save)."""
        p = self.policy
        if (p.every_steps and self.position.step % p.every_steps == 0) or epoch_ended:
            return True
        if not p.every_minutes:
            return False
        return any_rank(time.monotonic() - self._last_save >= 60 * p.every_minutes, self.device)

    def maybe_save(self, epoch_ended: bool) -> str | None:
        """After an optimizer step: save if ``due``. Returns the tag saved, or None."""
        return self.save() if self.due(epoch_ended) else None

    # -- saving --------------------------------------------------------------------------------------------
    def save(self) -> str | None:
        """Save the run at its position; None if this step is saved already. Returns the tag.

        DeepSpeed writes where it is told and follows links (``copyfile``, ``torch.save(path)``), also outside the
        tag directory (its recovery scripts go into its save_dir). So it is given a save_dir made fresh here,
        ``checkpoints/.saving/``, holding a fresh ``step_N/``; once every rank's files are in, rank 0 renames that
        into ``checkpoints/step_N``, and everything ds_face writes itself goes through ds_face.fileio."""
        step = self.position.step
        if self._saved_step == step:
            return None
        tag = f"{TAG_PREFIX}{step}"
        tag_dir, staging = self.save_dir / tag, self.save_dir / STAGING
        self._refuse_non_finite(tag_dir)
        error = None
        if self.rank == 0:
            try:
                self._clear_leftovers(tag_dir, staging)
            except (OSError, CheckpointError) as err:
                error = str(err) if isinstance(err, (CheckpointError, WriteError)) else _write_failure(err, staging)
        if any_rank(error is not None, self.device):  # nobody writes before the directories are made
            raise CheckpointError(f"{tag_dir}: checkpoint not saved ({error or 'rank 0 could not prepare it: its message says why'}); "
                                  f"nothing was written")
        from ds_face.checkpoint.zero_state import full_state
        backbone = full_state(self.engine, keep=self.rank == 0)  # collective: gathers every rank's partition
        try:
            self.engine.save_checkpoint(str(staging), tag=tag, save_latest=False)
        except (OSError, RuntimeError) as err:  # its own writes failed (a full disk: RuntimeError from torch.save)
            error = _write_failure(err, tag_dir, "DeepSpeed's files")
            torch.distributed.barrier()  # the other ranks wait in the barrier that ends DeepSpeed's save
        if error is None and self.rank == 0:  # DeepSpeed's save ends in a barrier: every rank's files are in
            try:
                os.rename(staging / tag, tag_dir)
            except OSError as err:
                error = _write_failure(err, tag_dir)
        path = tag_dir / head_file(self.rank, self.world_size)
        if not any_rank(error is not None, self.device):  # and a barrier: tag_dir is in place on every rank
            try:
                state = {"rank": self.rank, "world_size": self.world_size,
                         "sharded": {n: part.shard_state() for n, part in self.sharded.items()},
                         "replicated": {n: part.state_dict() for n, part in self.replicated.items()},
                         "per_rank": {n: part.state_dict() for n, part in self.per_rank.items()}}
                write_atomic(path, lambda f: torch.save(state, f))
                if self.rank == 0:
                    if backbone is not None:
                        backbone["engine_counters"] = {n: int(getattr(self.engine, n)) for n in ENGINE_COUNTERS}
                        path = tag_dir / BACKBONE_FULL
                        write_atomic(path, lambda f: torch.save(backbone, f))
                    path = tag_dir / META
                    write_json_atomic(path, make_meta(tag, self.position, self.world_size, self.run))
            except (OSError, RuntimeError) as err:
                error = _write_failure(err, path)
        if any_rank(error is not None, self.device):  # every rank learns that the save failed
            if self.rank == 0:  # its files are of no use and may fill the disk: `latest` names an older one
                for leftover in (tag_dir, staging):
                    try:
                        remove_entry(leftover)
                    except OSError:
                        pass
            raise CheckpointError(f"{tag_dir}: checkpoint not saved"
                                  + (f" (rank {self.rank}: {error})" if error else " (another rank failed to write)")
                                  + f"; {self.save_dir / LATEST} still names the previous one")
        torch.distributed.barrier()  # every rank's files are in place before `latest` names them
        if self.rank == 0:
            write_atomic(self.save_dir / LATEST, tag.encode())
            remove_entry(staging)  # only DeepSpeed's recovery scripts are left in it
            self._prune(keep=tag)
        torch.distributed.barrier()
        self._saved_step, self._last_save = step, time.monotonic()
        log.info(f"saved checkpoint {tag_dir}")
        return tag

    def _refuse_non_finite(self, tag_dir: Path) -> None:
        """Collective. A checkpoint with NaN/inf weights would put `latest` on a run that cannot go on."""
        from ds_face.checkpoint.zero_state import owned_values
        shards = [value for part in self.sharded.values() for value in part.shard_state().values()
                  if torch.is_tensor(value) and value.is_floating_point()]
        bad = any(not bool(torch.isfinite(t).all()) for t in shards) or any(
            not bool(torch.isfinite(owned_values(p)).all()) for p in self.engine.module.parameters())
        if any_rank(bad, self.device):
            raise CheckpointError(f"{tag_dir}: not saved: non-finite (NaN/inf) weights in the backbone or head "
                                  f"({'on this rank' if bad else 'on another rank'}); {self.save_dir / LATEST} "
                                  f"still names the previous checkpoint")

    def _clear_leftovers(self, tag_dir: Path, staging: Path) -> None:
        """Rank 0, before a save: the save_dir a real directory (made if missing); whatever is at ``step_N`` (a
        directory from a save that never completed, maybe on another world size, or a planted link: the link
        itself goes, never what it points to) removed, unless `latest` names it; DeepSpeed's save_dir made fresh."""
        if os.path.islink(self.save_dir):
            raise CheckpointError(f"{self.save_dir}: a symbolic link (to {os.readlink(self.save_dir)}); checkpoints "
                                  f"are written and pruned only in a directory ds_face made: remove the link or set "
                                  f"another output.dir")
        self.save_dir.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(tag_dir):
            if _latest_or_none(self.save_dir) == tag_dir.name:
                raise CheckpointError(f"{tag_dir}: {self.save_dir / LATEST} names it, so it is not overwritten")
            what = (f"a symbolic link (to {os.readlink(tag_dir)}); removing the link, its target untouched,"
                    if os.path.islink(tag_dir) else "left by an interrupted save; removing it")
            log.warning(f"{tag_dir}: {what} before saving this step")
            remove_entry(tag_dir)
        fresh_dir(staging)
        fresh_dir(staging / tag_dir.name)

    def _prune(self, keep: str) -> None:
        tags = checkpoint_tags(self.save_dir)
        keep_last = self.policy.keep_last
        for old in tags[:-keep_last] if keep_last > 0 else []:
            if old != keep:
                try:
                    remove_entry(self.save_dir / old)  # a link: the link, never its target
                except OSError as err:
                    log.warning(f"{self.save_dir / old}: not pruned ({err})")

    # -- loading -------------------------------------------------------------------------------------------
    def load(self) -> dict:
        """Collective: restore the latest complete checkpoint into freshly built parts, on any world size.
        Returns its ds_face_meta.json."""
        error = None
        try:  # every file checked before DeepSpeed's collectives, and every rank told if one rank failed
            tag = latest_tag(self.save_dir)
            tag_dir = self.save_dir / tag
            kind = engine_kind(self.engine.config)
            meta = check_resume(self.save_dir, self.run, kind)
            # every file, at any depth, weights-only and its counters and loss scales range-checked, before
            # DeepSpeed unpickles any of them with weights_only=False
            check_deepspeed_files(tag_dir, kind, meta["global_step"])
            old_world = meta["world_size"]
            files = head_slices(tag_dir, old_world, meta["num_classes"], meta["embedding_size"], list(self.sharded))
            check_position(files[0], meta, tag_dir)
            backbone = self._read_backbone_full(tag_dir, old_world, self.run["optimizer"])
        except CheckpointError as err:
            error = err
        if any_rank(error is not None, self.device):
            raise error or CheckpointError(f"{self.save_dir}: another rank could not read the checkpoint")
        self._load_backbone(tag, old_world, backbone)
        try:
            for name, part in self.sharded.items():
                part.load_shards([f["sharded"][name] for f in files])
            for name, part in self.replicated.items():
                part.load_state_dict(files[0]["replicated"][name])
            mine = files[self.rank % old_world]  # after a resize: old rank r mod W_old's streams
            for name, part in self.per_rank.items():
                part.load_state_dict(mine["per_rank"][name])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{tag_dir}: a component's state does not load ({type(err).__name__}: {err})") \
                from None
        self._saved_step, self._last_save = self.position.step, time.monotonic()
        log.info(f"resumed from {tag_dir} (step {meta['global_step']}, {meta['samples_seen']} samples seen, "
                 f"saved on {old_world} rank(s), now {self.world_size})")
        return meta

    def _read_backbone_full(self, tag_dir: Path, old_world: int, optimizer: str):
        if old_world == self.world_size:
            return None  # DeepSpeed's own files fit
        from ds_face.checkpoint.zero_state import is_partitioned
        if not is_partitioned(self.engine):
            return None  # stage 0 (fp32/fp16): DeepSpeed's files are the same for every world size
        path = tag_dir / BACKBONE_FULL
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; this checkpoint was saved on {old_world} rank(s) by an engine "
                                  f"whose state is not partitioned (ZeRO stage 0?), and this run partitions it: "
                                  f"resume with the ZeRO stage it was saved with")
        state = load_rank_file(path)  # memory-mapped: nothing is allocated from it before the check below
        from ds_face.checkpoint.zero_state import check_full_state
        try:  # exactly this backbone's parameters, shapes, fp32, finite, each tensor its own plain storage
            check_full_state(state, self.engine, optimizer)
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
        return state

    def _load_backbone(self, tag: str, old_world: int, backbone: dict | None) -> None:
        engine = self.engine
        if backbone is None:
            path, _ = engine.load_checkpoint(str(self.save_dir), tag=tag, load_module_strict=True,
                                             load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"{self.save_dir / tag}: DeepSpeed found no model states to load")
            return
        from ds_face.checkpoint.zero_state import load_full_state
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
    if isinstance(err, WriteError):  # refused before writing; it names the path
        return str(err)
    where = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(where).free
    label = f"{path}{f' ({what})' if what else ''}"
    if getattr(err, "errno", None) == errno.ENOSPC or free < 1 << 20:
        return f"{label}: no space left on device ({free} bytes free)"
    return f"{label}: {type(err).__name__}: {err}"


def _latest_or_none(save_dir: Path) -> str | None:
    """The tag `latest` names, through its one reader; None if there is no valid one."""
    try:
        return latest_tag(save_dir)
    except CheckpointError:
        return None


