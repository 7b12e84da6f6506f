"""The two configuration files, read and checked before any process group starts.

* The **run YAML** (``configs/*.yaml``) names backbone, embedding size, head,
  optimizer, schedule, data and output.
* The **DeepSpeed JSON** (``ds_configs/*.json``) alone decides ZeRO stage,
  precision, micro-batch per device, gradient accumulation and clipping.

Nothing is set in both. Every problem found is collected and reported in one
``ConfigError`` that names the file and the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from ds_face.backbones import BACKBONES
from ds_face.head.optim import OPTIMIZERS


class ConfigError(ValueError):
    pass


# synthetic: class-dependent generated images (ds_face.data.synthetic);
# arrow: a directory of shards written by data_prep (ds_face.data.arrow)
DATA_SOURCES = ("synthetic", "arrow")


@dataclass
class ModelConfig:
    backbone: str = "r50"
    embedding_size: int = 512
    dropout: float = 0.0
    gradient_checkpointing: bool = False


@dataclass
class HeadConfig:
    num_classes: int = 0
    sample_rate: float = 1.0
    margin: list = field(default_factory=lambda: [1.0, 0.5, 0.0])  # (m1, m2, m3); ArcFace m2=0.5
    scale: float = 64.0


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # used for the backbone (inside DeepSpeed) and the head (outside)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class ScheduleConfig:
    epochs: int = 20
    warmup_epochs: float = 0.0  # linear warm-up, then polynomial decay to 0
    power: float = 2.0
    max_steps: Optional[int] = None  # stop early after this many optimizer steps (schedule unchanged)


@dataclass
class DataConfig:
    source: str = "synthetic"  # one of DATA_SOURCES
    path: str = ""  # arrow: the directory written by data_prep (holds manifest.json)
    num_samples: int = 0  # synthetic only: images per epoch
    num_workers: int = 2  # arrow: DataLoader worker processes per rank (decode, flip)
    shuffle_buffer: int = 10000  # arrow: samples per worker's shuffle buffer (x ~8 KB of JPEG each)
    flip: bool = True  # arrow: random horizontal flip
    on_corrupt: str = "skip"  # arrow: an undecodable image is counted and skipped ("skip") or stops the run
    verify_sha256: bool = False  # arrow: before start, hash every shard against manifest.json (sizes: always)


@dataclass
class OutputConfig:
    dir: str = "work_dirs/run"
    log_every: int = 50
    tensorboard: bool = True


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also save every N optimizer steps (0: only at each epoch's end and at the finish)
    keep_last: int = 3  # complete checkpoints kept in <output.dir>/checkpoints (0: all)


@dataclass
class EvalConfig:
    sets: list = field(default_factory=list)  # InsightFace verification .bin files (lfw.bin, cfp_fp.bin, ...)
    every_steps: int = 0  # evaluate every N optimizer steps (0: only at the end of the run); rank 0 only
    batch_size: int = 128  # images per forward pass during evaluation


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 2048


@dataclass(frozen=True)
class BatchLayout:
    """The batch sizes, as DeepSpeed will compute them."""
    micro_batch: int
    accumulation: int
    world_size: int
    zero_stage: int = 0

    @property
    def per_step(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size


# -- reading ----------------------------------------------------------------------------------------

def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    path = Path(path)
    raw = _read(path, yaml.safe_load, "YAML")
    raw = {} if raw is None else raw
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    cfg = _build(RunConfig, raw, "", errors)
    if not errors:
        errors += _check_run(cfg)
    if errors:
        raise ConfigError(f"{path}: " + "\n  ".join(["invalid run config:"] + errors))
    return cfg


def load_ds_config(path: str | Path, world_size: int) -> tuple[dict, BatchLayout]:
    path = Path(path)
    ds = _read(path, json.loads, "JSON")
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(ds).__name__}")
    errors = []
    for key in ("optimizer", "scheduler"):
        if key in ds:
            errors.append(f"'{key}': remove it; ds_face builds the optimizer and LR schedule from the run YAML "
                          "so that the Partial FC head (outside DeepSpeed) uses the same ones")
    micro = ds.get("train_micro_batch_size_per_gpu")
    accumulation = ds.get("gradient_accumulation_steps", 1)
    if not _positive_int(micro):
        errors.append(f"'train_micro_batch_size_per_gpu' must be a positive integer, got {micro!r}")
    if not _positive_int(accumulation):
        errors.append(f"'gradient_accumulation_steps' must be a positive integer, got {accumulation!r}")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        errors.append("'fp16' and 'bf16' are both enabled; choose one")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        errors.append(f"'zero_optimization.stage' must be 0, 1, 2 or 3, got {stage!r}")
    if world_size < 1:
        errors.append(f"world size must be >= 1, got {world_size}")
    if not errors:
        layout = BatchLayout(micro, accumulation, world_size, stage)
        total = ds.get("train_batch_size")
        if total is not None and total != layout.per_step:
            errors.append(f"'train_batch_size' is {total}, but train_micro_batch_size_per_gpu ({micro}) x "
                          f"gradient_accumulation_steps ({accumulation}) x world size ({world_size}) = "
                          f"{layout.per_step}; fix it or drop it and let DeepSpeed compute it")
    if errors:
        raise ConfigError(f"{path}: " + "\n  ".join(["invalid DeepSpeed config:"] + errors))
    return ds, layout


def check_together(cfg: RunConfig, layout: BatchLayout, run_path: str | Path) -> None:
    """Checks that need both files and the world size."""
    errors = []
    if cfg.head.num_classes < layout.world_size:
        errors.append(f"head.num_classes ({cfg.head.num_classes}) must be >= world size ({layout.world_size}): "
                      "every rank owns at least one class centre")
    if cfg.data.source == "synthetic" and cfg.data.num_samples < layout.per_step:
        errors.append(f"data.num_samples ({cfg.data.num_samples}) is smaller than one optimizer step's batch "
                      f"({layout.per_step} = micro-batch x accumulation x world size)")
    if cfg.data.source == "arrow":
        from ds_face.data.arrow import DataError, count_streams
        from ds_face.data.shards import read_manifest
        manifest = read_manifest(cfg.data.path)  # _check_arrow has read it once already
        try:
            counts = count_streams(manifest.num_samples, len(manifest.shards), layout.micro_batch,
                                   layout.accumulation, layout.world_size, cfg.data.num_workers,
                                   where=f"data.path {cfg.data.path}")
        except DataError as err:
            errors.append(str(err))
        else:
            if counts.steps_per_epoch < 1:
                errors.append(f"data.path {cfg.data.path}: {manifest.num_samples} samples give each of the "
                              f"{counts.streams} loader streams {counts.rows_per_stream} rows, less than one "
                              f"optimizer step ({layout.per_step} samples)")
    if cfg.eval.sets and layout.zero_stage == 3:
        errors.append("'eval.sets' is not supported under ZeRO stage 3 (the backbone's parameters are "
                      "partitioned over the ranks, and evaluation runs on rank 0 alone); use stage 0-2, or "
                      "evaluate exported checkpoints with python -m ds_face.eval")
    if errors:
        raise ConfigError(f"{run_path}: " + "\n  ".join(["invalid run config for this launch:"] + errors))


# -- helpers ----------------------------------------------------------------------------------------

def _read(path: Path, parse, kind: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return parse(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid {kind}: {err}") from None


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        raw = raw.setdefault(part, {})
    raw[last] = value


def _build(cls, raw: dict, prefix: str, errors: list[str]):
    """Instantiate dataclass ``cls`` from ``raw``, recording unknown keys and wrong types."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            errors.append(f"unknown key '{where}'{hint}")
            continue
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                errors.append(f"'{where}' must be a mapping, got {value!r}")
                continue
            values[key] = _build(kind, value, f"{where}.", errors)
        elif _type_ok(value, kind):
            values[key] = float(value) if kind is float else value
        else:
            errors.append(f"'{where}' must be {_type_name(kind)}, got {value!r}")
    return cls(**values)


def _type_ok(value: Any, kind) -> bool:
    if get_origin(kind) is Union:
        return any(_type_ok(value, k) for k in get_args(kind))
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(kind) -> str:
    if get_origin(kind) is Union:
        return " or ".join(_type_name(k) for k in get_args(kind))
    return "null" if kind is type(None) else kind.__name__


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_run(cfg: RunConfig) -> list[str]:
    errors = []
    if cfg.model.backbone not in BACKBONES:
        errors.append(f"'model.backbone' is {cfg.model.backbone!r}; valid: {', '.join(BACKBONES)}")
    if cfg.model.embedding_size < 1:
        errors.append(f"'model.embedding_size' must be >= 1, got {cfg.model.embedding_size}")
    if cfg.head.num_classes < 1:
        errors.append(f"'head.num_classes' must be >= 1, got {cfg.head.num_classes}")
    if not 0.0 < cfg.head.sample_rate <= 1.0:
        errors.append(f"'head.sample_rate' must be in (0, 1], got {cfg.head.sample_rate}")
    margin = cfg.head.margin
    if not (isinstance(margin, list) and len(margin) == 3 and all(_type_ok(m, float) for m in margin)):
        errors.append(f"'head.margin' must be three numbers [m1, m2, m3], got {margin!r}")
    elif not (margin[0] > 0 and 0 <= margin[1] < math.pi / 2 and margin[2] >= 0):
        errors.append(f"'head.margin' {margin} out of range: need m1 > 0, 0 <= m2 < pi/2, m3 >= 0")
    if cfg.head.scale <= 0:
        errors.append(f"'head.scale' must be > 0, got {cfg.head.scale}")
    if cfg.optimizer.name not in OPTIMIZERS:
        errors.append(f"'optimizer.name' is {cfg.optimizer.name!r}; valid: {', '.join(OPTIMIZERS)}")
    if cfg.optimizer.lr <= 0:
        errors.append(f"'optimizer.lr' must be > 0, got {cfg.optimizer.lr}")
    if cfg.schedule.epochs < 1:
        errors.append(f"'schedule.epochs' must be >= 1, got {cfg.schedule.epochs}")
    if not 0 <= cfg.schedule.warmup_epochs < cfg.schedule.epochs:
        errors.append(f"'schedule.warmup_epochs' must be in [0, epochs), got {cfg.schedule.warmup_epochs}")
    if cfg.schedule.max_steps is not None and cfg.schedule.max_steps < 1:
        errors.append(f"'schedule.max_steps' must be >= 1 or null, got {cfg.schedule.max_steps}")
    if cfg.data.source not in DATA_SOURCES:
        errors.append(f"'data.source' is {cfg.data.source!r}; valid: {', '.join(DATA_SOURCES)}")
    elif cfg.data.source == "synthetic" and cfg.data.num_samples < 1:
        errors.append(f"'data.num_samples' must be >= 1 for synthetic data, got {cfg.data.num_samples}")
    elif cfg.data.source == "arrow":
        errors += _check_arrow(cfg)
    if cfg.checkpoint.every_steps < 0:
        errors.append(f"'checkpoint.every_steps' must be >= 0, got {cfg.checkpoint.every_steps}")
    if cfg.checkpoint.keep_last < 0:
        errors.append(f"'checkpoint.keep_last' must be >= 0, got {cfg.checkpoint.keep_last}")
    if cfg.output.log_every < 1:
        errors.append(f"'output.log_every' must be >= 1, got {cfg.output.log_every}")
    errors += _check_eval(cfg.eval)
    return errors


def _check_eval(e: EvalConfig) -> list[str]:
    errors = []
    if e.every_steps < 0:
        errors.append(f"'eval.every_steps' must be >= 0, got {e.every_steps}")
    if e.batch_size < 1:
        errors.append(f"'eval.batch_size' must be >= 1, got {e.batch_size}")
    for i, path in enumerate(e.sets):
        if not isinstance(path, str) or not path:
            errors.append(f"'eval.sets[{i}]' must be the path of a verification .bin file, got {path!r}")
        elif not Path(path).is_file():
            errors.append(f"'eval.sets[{i}]': file not found: {path}")
    return errors


def _check_arrow(cfg: RunConfig) -> list[str]:
    from ds_face.data.arrow import ON_CORRUPT
    from ds_face.data.shards import ShardError, check_shard_files, read_manifest
    d = cfg.data
    errors = []
    if d.num_workers < 0:
        errors.append(f"'data.num_workers' must be >= 0, got {d.num_workers}")
    if d.shuffle_buffer < 0:
        errors.append(f"'data.shuffle_buffer' must be >= 0, got {d.shuffle_buffer}")
    if d.on_corrupt not in ON_CORRUPT:
        errors.append(f"'data.on_corrupt' is {d.on_corrupt!r}; valid: {', '.join(ON_CORRUPT)}")
    if not d.path:
        return errors + ["'data.path' must name a directory written by data_prep (rec2arrow or folder2arrow)"]
    try:
        manifest = read_manifest(d.path)
        check_shard_files(manifest, d.path, full_hash=d.verify_sha256)  # sizes (and hashes) before any rank
    except ShardError as err:
        return errors + [f"'data.path': {err}"]
    if manifest.num_classes != cfg.head.num_classes:
        errors.append(f"'head.num_classes' is {cfg.head.num_classes}, but {d.path} has {manifest.num_classes} "
                      f"classes (manifest.json); set head.num_classes: {manifest.num_classes}")
    if list(manifest.image_size) != [112, 112]:
        errors.append(f"{d.path} holds {manifest.image_size[1]}x{manifest.image_size[0]} images; the IResNet "
                      f"backbones take 112x112 aligned faces")
    return errors
