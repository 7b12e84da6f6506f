"""The files of a checkpoint, read and checked: what resume, export and the launch's pre-flight share.

    <output.dir>/checkpoints/          DeepSpeed's save_dir (SAVE_DIR)
      latest                           tag of the newest COMPLETE checkpoint; replaced atomically, last of all
      step_300/
        mp_rank_00_model_states.pt ... DeepSpeed: backbone and its (ZeRO-partitioned) optimizer
        backbone_full.pt               rank 0: the backbone's fp32 masters + optimizer state, gathered
                                       (ds_face.checkpoint.zero_state), for a resume on another world size
        head_rank0_of2.pt ...          one per rank: every sharded part's rows (the Partial FC head and its
                                       optimizer), the replicated parts (position, data identity) and this
                                       rank's own (RNG streams, BatchNorm buffers)
        ds_face_meta.json              rank 0: step, samples seen, batch layout, classes, backbone, config

Every reader here treats the files as hostile: sizes and counts bounded by what is there before any loop,
tensors checked before anything is allocated from them, each error a CheckpointError naming the file.
The writer is ds_face.checkpoint.manager; the meta's keys are made and checked here (``make_meta``, ``read_meta``).
"""
from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path

import torch

from ds_face.backbones import BACKBONES
from ds_face.checkpoint.safe_load import MAX_COUNT, UnsafeFileError, check_checkpoint_dir, check_meta_counts, load_weights_only
from ds_face.checkpoint.zero_state import check_plain
from ds_face.config.bounded import NotARegularFile, load_json_file, read_at_most

LATEST = "latest"
SAVE_DIR = "checkpoints"  # inside output.dir
META = "ds_face_meta.json"
BACKBONE_FULL = "backbone_full.pt"
TAG_PREFIX = "step_"
STAGING = ".saving"  # DeepSpeed's save_dir during a save, inside SAVE_DIR (CheckpointManager.save)
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


class CheckpointError(ValueError):
    """A checkpoint that is missing, partial, corrupt or does not fit this run; the message names the file."""


HEAD_FILE = re.compile(r"^head_rank(\d+)_of(\d+)\.pt\Z")
META_KEYS = ("world_size", "num_classes", "embedding_size", "global_step", "epoch", "backbone", "samples_seen",
             "micro_batch", "accumulation")  # what read_meta requires (make_meta writes them and more)


def head_file(rank: int, world_size: int) -> str:
    return f"head_rank{rank}_of{world_size}.pt"


def run_identity(cfg) -> dict:
    """What a checkpoint must share with a run to be resumed by it (``check_resume``); the world size, the batch
    and the data's length may change."""
    return {"num_classes": cfg.head.num_classes, "embedding_size": cfg.model.embedding_size,
            "backbone": cfg.model.backbone, "optimizer": cfg.optimizer.name}


def run_meta(cfg, layout, epoch_size: int) -> dict:
    """What a checkpoint's meta says of the run besides its position: its identity, batch layout, epoch length
    and config."""
    from dataclasses import asdict
    return {**run_identity(cfg), "micro_batch": layout.micro_batch, "accumulation": layout.accumulation,
            "global_batch": layout.global_batch, "epoch_size": epoch_size, "config": asdict(cfg)}


def make_meta(tag: str, position, world_size: int, run: dict) -> dict:
    """ds_face_meta.json of a save: the tag, the run's position, the world size, and ``run`` (``run_meta``)."""
    return {"tag": tag, "global_step": position.step, "world_size": world_size,
            "samples_seen": position.samples, "epoch": position.samples // run["epoch_size"],
            **{key: value for key, value in run.items() if key != "optimizer"}}  # the config names the optimizer



# -- reading: resume and export both use these ---------------------------------------------------------------

TAG_NAME = re.compile(rf"^{TAG_PREFIX}(0|[1-9][0-9]{{0,17}})\Z")  # what a save names a tag: step_<optimizer step>
MAX_LATEST_BYTES = 256  # `latest` holds one tag name


def latest_tag(save_dir: str | Path) -> str:
    """The tag `latest` names: the one reader of `latest` (resume, export, a save's clean-up). `latest` must be a
    plain file of at most 256 bytes (only that much is read) holding a tag name as a save writes it
    (``step_<N>``), and that tag a plain directory in ``save_dir`` (not a link)."""
    save_dir = Path(save_dir)
    path = save_dir / LATEST
    if not save_dir.is_dir():
        raise CheckpointError(f"{save_dir}: no checkpoint directory to resume from")
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: not found; no complete checkpoint in {save_dir}")
    try:  # no-follow and non-blocking: a link or a fifo planted as `latest` is refused, never followed or waited on
        data = read_at_most(path, MAX_LATEST_BYTES, follow_links=False)
    except NotARegularFile:
        raise CheckpointError(f"{path}: not a regular file; a save writes `latest` as a plain file naming a tag") \
            from None
    except OSError as err:
        what = "a symbolic link" if os.path.islink(path) else f"unreadable ({err.strerror or err})"
        raise CheckpointError(f"{path}: {what}; a save writes `latest` as a plain file naming a tag") from None
    if len(data) > MAX_LATEST_BYTES:
        raise CheckpointError(f"{path}: longer than {MAX_LATEST_BYTES} bytes; it should hold one tag name such as "
                              f"step_300 (a save writes it): corrupt or not ds_face's")
    tag = data.decode("ascii", errors="replace").strip()
    if not tag:
        raise CheckpointError(f"{path} is empty")
    if not TAG_NAME.match(tag):
        raise CheckpointError(f"{path} names {tag!r}, which is not a tag name a save writes (step_<N>)")
    try:
        mode = os.lstat(save_dir / tag).st_mode
    except OSError:
        tags = ", ".join(checkpoint_tags(save_dir)) or "none"
        raise CheckpointError(f"{path} names tag {tag!r}, but {save_dir / tag} does not exist (tags in "
                              f"{save_dir}: {tags})") from None
    if not stat.S_ISDIR(mode):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "not a directory"
        raise CheckpointError(f"{save_dir / tag}: {what}; `latest` must name a checkpoint directory of {save_dir} "
                              f"(a save writes one, never a link)")
    return tag


def checkpoint_tags(save_dir: Path) -> list[str]:
    """The step_N directories of a save_dir, oldest first (links and other entries are not tags)."""
    tags = [p for p in save_dir.glob(f"{TAG_PREFIX}*")
            if TAG_NAME.match(p.name) and not p.is_symlink() and p.is_dir()]
    return [p.name for p in sorted(tags, key=lambda p: int(p.name[len(TAG_PREFIX):]))]


def read_meta(tag_dir: Path) -> dict:
    """rank 0's ds_face_meta.json of a tag directory, checked (resume and export both read it here)."""
    path = tag_dir / META
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; {tag_dir} is not a complete ds_face checkpoint "
                              f"(rank 0 writes it with every save)")
    try:  # bounded: size before parsing, depth while parsing
        meta = load_json_file(path, what="checkpoint's meta file")
    except ValueError as err:
        raise CheckpointError(f"{path}: corrupt ({str(err).removeprefix(f'{path}: ')})") from None
    missing = [key for key in META_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise CheckpointError(f"{path}: corrupt (missing {', '.join(missing)})")
    try:  # every count bounded by what the directory holds, before any loop uses one
        check_meta_counts(meta, tag_dir, META)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if meta["backbone"] not in BACKBONES:
        raise CheckpointError(f"{path}: unknown backbone {meta['backbone']!r} (known: {', '.join(BACKBONES)})")
    return meta


def load_rank_file(path: Path) -> dict:
    """One rank's file of a checkpoint, through the weights-only loader, memory-mapped."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; the checkpoint is incomplete")
    try:
        return load_weights_only(path, mmap=True)
    except UnsafeFileError as err:
        raise CheckpointError(str(err)) from None


def head_slices(tag_dir: Path, world_size: int, num_classes: int, embedding_size: int,
                parts: list[str] | None = None) -> list[dict]:
    """All ranks' files of one checkpoint (``head_rank<r>_of<W>.pt``), in rank order: one save's complete set (no
    file missing, none left from a save on another world size). Each holds its sharded parts under ``sharded``
    (``parts``: exactly these names; None: at least ``head``); the head's [num_local, D] slices tile
    [0, num_classes) exactly, no gap and no overlap, and every other sharded part holds the same rows as the head
    on its rank. Resume and export both read the files through this; every error names the file."""
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
    paths = [tag_dir / head_file(r, world_size) for r in range(world_size)]
    files = [load_rank_file(path) for path in paths]
    cursor, previous = 0, None
    for rank, (path, file) in enumerate(zip(paths, files)):
        sharded = file.get("sharded") if isinstance(file, dict) else None
        if not (isinstance(sharded, dict) and all(isinstance(s, dict) for s in sharded.values())):
            raise CheckpointError(f"{path}: not a ds_face checkpoint file (no 'sharded' parts)")
        if (parts is not None and sorted(sharded) != sorted(parts)) or "head" not in sharded:
            raise CheckpointError(f"{path}: holds the sharded parts {sorted(sharded)}, expected "
                                  f"{sorted(parts or ['head'])}")
        part = sharded["head"]
        fields = ("class_start", "num_local", "num_classes")
        if not (torch.is_tensor(part.get("weight")) and part["weight"].dim() == 2
                and all(_whole(part.get(k), 0, 2**53) for k in fields)
                and all(_whole(file.get(k, 0), 0, 2**53) for k in ("rank", "world_size"))):
            raise CheckpointError(f"{path}: not a head slice (needs a 2-d 'weight' tensor and integer "
                                  f"class_start, num_local, num_classes)")
        weight = part["weight"]
        start, count, total = (int(part[k]) for k in fields)
        rows, dim = weight.shape
        problem = None
        if file.get("rank", rank) != rank or file.get("world_size", world_size) != world_size:
            problem = f"says rank {file.get('rank')} of {file.get('world_size')}, not what its name says"
        elif rows != count or dim != embedding_size:
            problem = f"weight is {rows}x{dim}, expected {count}x{embedding_size}"
        elif total != num_classes:
            problem = f"was saved for {total} classes, the checkpoint says {num_classes}"
        elif start != cursor:
            where = f"after {previous.name} (which ends at class {cursor})" if previous else "at the start"
            problem = (f"starts at class {start}, expected {cursor}: "
                       f"{'a gap' if start > cursor else 'an overlap'} {where}")
        else:
            problem = next((f"part '{name}' holds classes {other.get('class_start')!r}+{other.get('num_local')!r}, "
                            f"the head {start}+{count}" for name, other in sharded.items()
                            if (other.get("class_start", start), other.get("num_local", count)) != (start, count)),
                           None)
        if problem:
            raise CheckpointError(f"{path}: head slice {problem}; the slices of {tag_dir} do not tile "
                                  f"{num_classes} classes (refusing to re-initialise any)")
        _check_head_tensors(path, file, part["weight"], rows * dim)
        cursor, previous = cursor + rows, path
    if cursor != num_classes:
        raise CheckpointError(f"{tag_dir}: the {world_size} head slices hold {cursor} classes, expected "
                              f"{num_classes}: they end at class {cursor} ({previous.name}) "
                              f"(refusing to re-initialise any)")
    return files


HEAD_FILE_SLACK = 64 << 20  # a head file's bytes besides its slice and optimizer rows: RNG states, BatchNorm buffers


def _check_head_tensors(path: Path, part: dict, weight: torch.Tensor, weights: int) -> None:
    """Every tensor of a head file (memory-mapped) before anything is allocated from it: the slice float32 and
    finite; each tensor owning exactly its storage (no expanded stride-0 view, none shared); float ones finite;
    all together at most the slice and three optimizer copies of it, plus RNG states and buffers."""
    if weight.dtype != torch.float32:
        raise CheckpointError(f"{path}: 'weight' is {weight.dtype}, expected float32")
    pending, storages, total = [(part, "")], set(), 0
    while pending:
        node, where = pending.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, (list, tuple)) else ()
        for key, value in items:
            name = f"{where}.{key}" if where else str(key)
            if not torch.is_tensor(value):
                pending.append((value, name))
                continue
            try:
                check_plain(value, f"'{name}'", storages)
            except ValueError as err:
                raise CheckpointError(f"{path}: {err}") from None
            total += value.untyped_storage().nbytes()
            if total > 4 * 4 * weights + HEAD_FILE_SLACK:
                raise CheckpointError(f"{path}: its tensors hold more than {4 * 4 * weights + HEAD_FILE_SLACK} "
                                      f"bytes, far more than a head slice of {weights} weights and its optimizer "
                                      f"state: not a head file ds_face wrote")
            if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{path}: '{name}' holds NaN or inf")


def check_deepspeed_files(tag_dir: Path, run: dict | None = None, max_step: int | None = None) -> None:
    """Every file of the tag directory, at any depth, through the weights-only loader (DeepSpeed's few types
    allowed) before DeepSpeed's own torch.load(weights_only=False) sees any: a file that would run code, a link, a
    fifo is refused, named. With ``run`` (``engine_kind``) and ``max_step``: and the counters and loss scales each
    file holds range-checked for that run (``check_states``)."""
    inspect = None if run is None else (lambda path, obj: check_states(path, obj, run, max_step))
    try:
        check_checkpoint_dir(tag_dir, inspect)
    except UnsafeFileError as err:
        raise CheckpointError(str(err)) from None


def check_fits(meta: dict, run: dict, meta_path: Path) -> None:
    """The checkpoint's classes, embedding size and backbone are the run's (``run``: ``run_identity``)."""
    problems = [f"{key} is {meta[key]} in the checkpoint, {run[key]} in the run config"
                for key in ("num_classes", "embedding_size", "backbone") if meta.get(key) != run[key]]
    if problems:
        raise CheckpointError(f"{meta_path}: does not fit this run: " + "; ".join(problems))


# -- the kind of run a checkpoint comes from, and the values DeepSpeed and ds_face restore from it -------------

MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO 3


def engine_kind(ds_config: dict) -> dict:
    """What a DeepSpeed config trains with: ZeRO stage, precision, and (fp16) whether the loss scale is dynamic
    and its floor. Raises ValueError/TypeError/AttributeError for a config that is not a DeepSpeed JSON object."""
    fp16 = ds_config.get("fp16") or {}
    precision = "fp16" if fp16.get("enabled") else "bf16" if (ds_config.get("bf16") or {}).get("enabled") else "fp32"
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise ValueError(f"ZeRO stage {stage!r}")
    return {"zero_stage": stage, "precision": precision,
            "dynamic": precision == "fp16" and not fp16.get("loss_scale", 0),
            "min_scale": float(fp16.get("min_loss_scale", 1))}


def saved_engine_kind(tag_dir: Path) -> dict:
    """``engine_kind`` of the DeepSpeed config a checkpoint was saved with (in DeepSpeed's model-states file)."""
    path = next((tag_dir / n for n in MODEL_STATES if (tag_dir / n).is_file()), None)
    if path is None:
        raise CheckpointError(f"{tag_dir / MODEL_STATES[0]}: not found (nor {MODEL_STATES[1]}, ZeRO 3): the "
                              f"checkpoint is incomplete")
    states = load_rank_file(path)
    try:
        return engine_kind(states["ds_config"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: no readable 'ds_config' (the DeepSpeed config it was saved with: "
                              f"{type(err).__name__}: {err})") from None


def check_resume(save_dir: str | Path, run: dict, kind: dict) -> dict:
    """The checks a resume makes before anything is restored, and that ``ds_face.train`` makes before any process
    group starts: `latest`, ds_face_meta.json, the checkpoint fits the run (``run``: ``run_identity``; ``check_fits``),
    and it was saved with this run's ZeRO stage, precision and optimizer (``kind``: ``engine_kind`` of its
    DeepSpeed JSON). Returns the meta."""
    tag_dir = Path(save_dir) / latest_tag(save_dir)
    meta = read_meta(tag_dir)
    check_fits(meta, run, tag_dir / META)
    saved = saved_engine_kind(tag_dir)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    optimizer = config.get("optimizer").get("name") if isinstance(config.get("optimizer"), dict) else None
    problems = [f"{what} {saved[key]} in the checkpoint, {kind[key]} in this run"
                for key, what in (("zero_stage", "ZeRO stage"), ("precision", "precision")) if saved[key] != kind[key]]
    if optimizer != run["optimizer"]:
        saved_as = repr(optimizer) if optimizer is not None else f"not named (no 'config.optimizer.name' in {META})"
        problems.append(f"optimizer {saved_as} in the checkpoint, {run['optimizer']} in this run")
    if problems:
        raise CheckpointError(f"{tag_dir}: saved by another kind of run: {'; '.join(problems)}; resume with the "
                              f"ZeRO stage, precision and optimizer it was saved with (world size and batch may "
                              f"change)")
    return meta


def check_position(rank0: dict, meta: dict, tag_dir: Path) -> None:
    """The run's position in rank 0's head file is the one ds_face_meta.json states."""
    position = (rank0.get("replicated") or {}).get("position") if isinstance(rank0.get("replicated"), dict) else None
    expected = {"step": meta["global_step"], "samples": meta["samples_seen"]}
    if position != expected:
        raise CheckpointError(f"{tag_dir / head_file(0, meta['world_size'])}: the run's position is {position!r}, but "
                              f"{META} says {expected}: files from different saves, or forged")


MAX_STATE_ENTRIES = 1_000_000  # dict/list entries walked in one file (r100's optimizer shards: a few thousand)


def _whole(value, low, high) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and value == int(value) and low <= value <= high)


def _state_rules(run: dict, max_step: int) -> dict:
    """key -> check(value) -> problem or None, for every counter and loss-scale field DeepSpeed (its engine,
    ZeRO optimizers, fp16 optimizers, loss scalers) or ds_face (backbone_full.pt, head files) saves. DeepSpeed
    restores its loss scaler object from the file as it is: a NaN or 1e38 scale in an fp32 run skips every step."""
    def whole(low, high, what=""):
        def check(value):
            if torch.is_tensor(value):  # a step count, or one per row (the head's AdamW)
                if value.untyped_storage().nbytes() < value.numel() * value.element_size():
                    return "expected a tensor owning its storage, not an expanded view"
                if value.is_complex() or value.dtype == torch.bool:
                    return f"expected whole numbers in [{low}, {high}]{what}"
                values = value.detach().double().flatten()
                if values.numel() and not (bool(torch.isfinite(values).all()) and bool((values == values.round()).all())
                                           and low <= float(values.min()) and float(values.max()) <= high):
                    return f"expected whole numbers in [{low}, {high}]{what}"
                return None
            if not _whole(value, low, high):
                return f"expected a whole number in [{low}, {high}]{what}"
        return check

    fp16 = run["precision"] == "fp16"
    kind = ("dynamic" if run["dynamic"] else "static") if fp16 else "absent"

    def scale(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "expected a number"
        if not fp16:
            return None if value == 1 else (f"this run is {run['precision']}, whose loss scale is exactly 1 (a NaN "
                                             f"or huge scale makes every step overflow and be skipped)")
        if not (math.isfinite(value) and 0 < value <= 2.0 ** 64):
            return "an fp16 loss scale is a finite number in (0, 2**64]"
        if run["dynamic"] and not (math.frexp(value)[0] == 0.5 and value >= min(run["min_scale"], 1.0)):
            return f"a dynamic fp16 loss scale is a power of two >= min_loss_scale ({run['min_scale']:g})"
        return None

    def dynamic(value):
        if value is not (fp16 and run["dynamic"]):
            return f"this run's loss scale is {kind}"

    def positive(value):
        if not (_is_number(value) and 0 < value <= 2.0 ** 64):
            return "expected a finite number in (0, 2**64]"

    steps = whole(0, max_step, f" (the checkpoint is at step {max_step})")
    return {"cur_scale": scale, "dynamic": dynamic, "dynamic_loss_scale": dynamic, "min_scale": positive,
            "scale_factor": lambda v: None if _is_number(v) and 1 < v <= 1024 else "expected a number in (1, 1024]",
            "scale_window": whole(1, 2**31), "delayed_shift": whole(1, 2**31), "cur_hysteresis": whole(0, 2**31),
            "cur_iter": whole(0, MAX_COUNT), "last_overflow_iter": whole(-1, MAX_COUNT),
            "step": lambda v: None if v is None else steps(v), "global_steps": steps, "skipped_steps": steps,
            "steps_applied": steps,
            "steps_skipped": steps, "global_samples": whole(0, MAX_COUNT)}


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_states(path: Path, obj, run: dict, max_step: int) -> None:
    """The counters and loss scales one checkpoint file holds, wherever DeepSpeed or ds_face keeps them (found by
    key name in dicts, lists and DeepSpeed's own objects), range-checked for this run (``_state_rules``). Raises
    CheckpointError naming the file and the key."""
    rules = _state_rules(run, max_step)
    pending, walked = [(obj, "")], 0
    while pending:
        node, where = pending.pop()
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, (list, tuple)):
            items = enumerate(node)
        elif type(node).__module__.startswith("deepspeed.") and hasattr(node, "__dict__"):
            items = vars(node).items()  # LossScaler, DynamicLossScaler, fragment_address
        else:
            continue
        for key, value in items:
            walked += 1
            if walked > MAX_STATE_ENTRIES:
                raise CheckpointError(f"{path}: holds more than {MAX_STATE_ENTRIES} entries; not a checkpoint file "
                                      f"ds_face or DeepSpeed wrote")
            name = f"{where}.{key}" if where else str(key)
            check = rules.get(key) if isinstance(key, str) else None
            problem = check(value) if check else None
            if problem:
                shown = repr(value)[:60] if not torch.is_tensor(value) else (
                    repr(value.item()) if value.numel() == 1 and problem.startswith("expected whole")
                    else f"a {value.dtype} tensor of {value.numel()} elements")
                raise CheckpointError(f"{path}: '{name}' is {shown}; {problem}")
            if not torch.is_tensor(value):
                pending.append((value, name))


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
