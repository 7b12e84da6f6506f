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
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from ds_face.backbones import BACKBONES

OPTIMIZERS = ("sgd", "adamw")  # for the backbone (torch.optim) and the head (ds_face.head.optim)


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
    max_nonfinite_steps: int = 3  # stop after this many consecutive steps with a NaN/inf loss (fp16 skips excepted)


@dataclass
class DataConfig:
    source: str = "synthetic"  # one of DATA_SOURCES
    path: str = ""  # arrow: the directory written by data_prep (holds manifest.json)
    num_samples: int = 0  # synthetic only: images per epoch
    num_workers: int = 2  # arrow: DataLoader worker processes per rank (decode, flip)
    streams: int = 16  # shards read at once and mixed into every micro-batch (ds_face.data.order); fixed for a run
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
    keep_global_batch: bool = True  # on a resume with another world size, adjust accumulation to keep it


@dataclass
class IJBEvalConfig:
    root: str = ""  # an IJB-B/C release directory (loose_crop/, meta/); empty: no IJB evaluation
    target: str = "IJBC"  # IJBC or IJBB: reads meta/<target lower case>_*.txt


@dataclass
class EvalConfig:
    sets: list = field(default_factory=list)  # InsightFace verification .bin files (lfw.bin, cfp_fp.bin, ...)
    every_steps: int = 0  # evaluate every N optimizer steps (0: only at the end of the run); rank 0 only
    batch_size: int = 128  # images per forward pass during evaluation
    ijb: IJBEvalConfig = field(default_factory=IJBEvalConfig)  # IJB-B/C 1:1 verification at the end of the run


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


# Sane upper bounds: far above any published setting, low enough to catch a typo or a wrong unit.
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 1.0
MAX_SCALE = 1024.0  # the logit scale s (arcface_torch: 64)
MAX_M1 = 10.0  # multiplicative angular margin (SphereFace: 4; ArcFace/CosFace: 1)
MAX_M3 = 1.0  # additive cosine margin (CosFace: 0.35-0.4); cos lies in [-1, 1]
MAX_POWER = 100.0  # polynomial decay exponent


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


# A number as people write it. YAML 1.1 (PyYAML) reads `1e-3` and `5E4` as strings (it wants `1.0e-3`);
# a float field given such a string takes the number it obviously means.
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_KEY_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_set_overrides(pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` pairs -> {dotted key: value}; VALUE is YAML (``[1.0, 0.5, 0.0]``, ``true``,
    ``null``), and a number written ``1e-3`` is a number. Raises ConfigError naming the pair."""
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        if not all(_KEY_PART.match(part) for part in key.split(".")):
            raise ConfigError(f"--set {pair!r}: {key!r} is not a dotted key like optimizer.lr")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {pair!r}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value) if any(c in value for c in ".eE") else int(value)
        overrides[key] = value
    return overrides


# -- reading ----------------------------------------------------------------------------------------

def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    path = Path(path)
    raw = _read(path, yaml.safe_load, "YAML")
    raw = {} if raw is None else raw
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        problem = _set_dotted(raw, dotted, value)
        if problem:
            errors.append(f"--set {dotted}: {problem}")
    if errors:
        raise ConfigError(f"{path}: " + "\n  ".join(["invalid run config:"] + errors))
    cfg = _build(RunConfig, raw, "", errors)
    if not errors:
        errors += _check_run(cfg)
    if errors:
        raise ConfigError(f"{path}: " + "\n  ".join(["invalid run config:"] + errors))
    return cfg


def load_ds_config(path: str | Path, world_size: int | None) -> tuple[dict, BatchLayout]:
    """The DeepSpeed JSON, type-checked; ``world_size=None`` (before launch: not known yet) skips the checks
    that need it."""
    path = Path(path)
    ds = _read(path, json.loads, "JSON")
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(ds).__name__}")
    errors = check_ds_json(ds)
    if errors:  # the checks below assume the types are right
        raise ConfigError(f"{path}: " + "\n  ".join(["invalid DeepSpeed config:"] + errors))
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
    if world_size is not None and world_size < 1:
        errors.append(f"world size must be >= 1, got {world_size}")
    if not errors:
        layout = BatchLayout(micro, accumulation, world_size or 1, stage)
        total = ds.get("train_batch_size")
        if total is not None and world_size is not None and total != layout.per_step:
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
    if cfg.data.source == "synthetic" and cfg.data.num_samples * cfg.schedule.epochs < layout.per_step:
        errors.append(f"data.num_samples ({cfg.data.num_samples}) x schedule.epochs is smaller than one optimizer "
                      f"step's batch ({layout.per_step} = micro-batch x accumulation x world size)")
    if cfg.data.source == "arrow":
        from ds_face.data.shards import read_manifest
        manifest = read_manifest(cfg.data.path)  # _check_arrow has read it once already
        if manifest.num_samples * cfg.schedule.epochs < layout.per_step:
            errors.append(f"data.path {cfg.data.path}: {cfg.schedule.epochs} epoch(s) of {manifest.num_samples} "
                          f"samples are fewer than one optimizer step ({layout.per_step} samples)")
    if cfg.eval.sets and layout.zero_stage == 3:
        errors.append("'eval.sets' is not supported under ZeRO stage 3 (the backbone's parameters are "
                      "partitioned over the ranks, and evaluation runs on rank 0 alone); use stage 0-2, or "
                      "evaluate exported checkpoints with python -m ds_face.eval")
    if cfg.eval.ijb.root and layout.zero_stage == 3:
        errors.append("'eval.ijb' is not supported under ZeRO stage 3 (the backbone's parameters are "
                      "partitioned over the ranks, and evaluation runs on rank 0 alone); use stage 0-2, or "
                      "evaluate exported checkpoints with python -m ds_face.eval ijb")
    if errors:
        raise ConfigError(f"{run_path}: " + "\n  ".join(["invalid run config for this launch:"] + errors))


# -- the DeepSpeed JSON's keys and types ----------------------------------------------------------------

# DeepSpeed 0.19.8's top-level keys (docs "Config JSON" and runtime/config.py). A key outside this list is
# ignored by DeepSpeed without a word, so a typo ("fp_16") silently trains in fp32: refuse it.
DS_SECTIONS = (  # keys whose value is a JSON object
    "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "zero_optimization", "aio", "activation_checkpointing",
    "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "autotuning", "elasticity",
    "data_efficiency", "curriculum_learning", "data_types", "checkpoint", "pipeline", "hybrid_engine",
    "compression_training", "tensor_parallel", "compile", "nebula", "timers", "sparse_attention", "optimizer",
    "scheduler", "progressive_layer_drop", "eigenvalue", "quantize_training", "weight_quantization",
    "expert_parallel")
DS_BOOLS = ("prescale_gradients", "sparse_gradients", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
            "wall_clock_breakdown", "dump_state", "memory_breakdown", "dataloader_drop_last", "disable_allgather",
            "disable_python_gc", "use_data_before_expert_parallelism", "managed_gradient_accumulation")
DS_POSITIVE_INTS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "steps_per_print")
DS_OTHER = ("gradient_clipping", "gradient_predivide_factor", "communication_data_type",
            "seq_parallel_communication_data_type", "gradient_allreduce_op", "log_level", "vocabulary_size")
DS_KEYS = DS_SECTIONS + DS_BOOLS + DS_POSITIVE_INTS + DS_OTHER


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_ds_json(ds: dict) -> list[str]:
    """Problems in a DeepSpeed JSON that DeepSpeed would meet late (an AttributeError after start-up) or never
    (a misspelt key it ignores): unknown top-level keys, sections that are not objects, wrong types, NaN,
    numbers out of range. Each names the key."""
    errors = []
    for key in ds:
        if key not in DS_KEYS:
            close = difflib.get_close_matches(str(key), DS_KEYS, n=1, cutoff=0.6)
            errors.append(f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else
                                                   " (not a DeepSpeed 0.19.8 config key)"))
    for key in DS_SECTIONS:
        if key in ds and not isinstance(ds[key], dict):
            errors.append(f"'{key}' must be a JSON object {{...}}, got {ds[key]!r}")
    for key in DS_BOOLS:
        if key in ds and not isinstance(ds[key], bool):
            errors.append(f"'{key}' must be true or false, got {ds[key]!r}")
    for key in DS_POSITIVE_INTS:
        if key in ds and not (_is_int(ds[key]) and ds[key] > 0):
            errors.append(f"'{key}' must be a positive integer, got {ds[key]!r}")
    if "gradient_clipping" in ds and not (_is_number(ds["gradient_clipping"]) and ds["gradient_clipping"] >= 0):
        errors.append(f"'gradient_clipping' must be a finite number >= 0 (0: off), got {ds['gradient_clipping']!r}")
    if "gradient_predivide_factor" in ds and not (_is_number(ds["gradient_predivide_factor"])
                                                  and ds["gradient_predivide_factor"] > 0):
        errors.append(f"'gradient_predivide_factor' must be a finite number > 0, got "
                      f"{ds['gradient_predivide_factor']!r}")
    for key in ("fp16", "bf16", "bfloat16", "amp", "torch_autocast"):
        section = ds.get(key)
        if isinstance(section, dict) and "enabled" in section and not isinstance(section["enabled"], bool):
            errors.append(f"'{key}.enabled' must be true or false, got {section['enabled']!r}")
    fp16 = ds.get("fp16") if isinstance(ds.get("fp16"), dict) else {}
    for key, ok, want in (
            ("loss_scale", lambda v: _is_number(v) and v >= 0, "a finite number >= 0 (0: dynamic)"),
            ("initial_scale_power", lambda v: _is_int(v) and 0 <= v <= 64, "an integer in [0, 64]"),
            ("loss_scale_window", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
            ("hysteresis", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
            ("min_loss_scale", lambda v: _is_number(v) and v > 0, "a finite number > 0"),
            ("consecutive_hysteresis", lambda v: isinstance(v, bool), "true or false")):
        if key in fp16 and not ok(fp16[key]):
            errors.append(f"'fp16.{key}' must be {want}, got {fp16[key]!r}")
    zero = ds.get("zero_optimization") if isinstance(ds.get("zero_optimization"), dict) else {}
    if "stage" in zero and not (_is_int(zero["stage"]) and zero["stage"] in (0, 1, 2, 3)):
        errors.append(f"'zero_optimization.stage' must be 0, 1, 2 or 3, got {zero['stage']!r}")
    return errors


# -- helpers ----------------------------------------------------------------------------------------

def _read(path: Path, parse, kind: str) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return parse(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid {kind}: {err}") from None


def _set_dotted(raw: dict, dotted: str, value: Any) -> str | None:
    """Set raw[a][b][c] = value for "a.b.c"; returns what is wrong instead of raising (a key under a value)."""
    *parents, last = dotted.split(".")
    for depth, part in enumerate(parents):
        node = raw.setdefault(part, {})
        if not isinstance(node, dict):
            where = ".".join(parents[:depth + 1])
            return f"'{where}' is {node!r}, not a mapping: it has no key '{dotted[len(where) + 1:]}'"
        raw = node
    raw[last] = value
    return None


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
        else:
            if isinstance(value, str) and _NUMBER.match(value.strip()) and _accepts_float(kind):
                value = float(value)  # `lr: 1e-3` (YAML 1.1 reads it as a string)
            if not _type_ok(value, kind):
                errors.append(f"'{where}' must be {_type_name(kind)}, got {value!r}")
                continue
            if _accepts_float(kind) and isinstance(value, int) and abs(value) > 2**53:
                value = math.inf  # an absurd integer in a float field: refused below like inf
            if kind is float or isinstance(value, float):
                value = float(value)
                if not math.isfinite(value):  # NaN passes every `x <= 0` check: refuse it here, for every field
                    errors.append(f"'{where}' must be a finite number, got {raw[key]!r}")
                    continue
            values[key] = value
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


def _accepts_float(kind) -> bool:
    return kind is float or (get_origin(kind) is Union and float in get_args(kind))


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
    if not 0.0 <= cfg.model.dropout < 1.0:
        errors.append(f"'model.dropout' must be in [0, 1), got {cfg.model.dropout}")
    if cfg.head.num_classes < 1:
        errors.append(f"'head.num_classes' must be >= 1, got {cfg.head.num_classes}")
    if not 0.0 < cfg.head.sample_rate <= 1.0:
        errors.append(f"'head.sample_rate' must be in (0, 1], got {cfg.head.sample_rate}")
    margin = cfg.head.margin
    if not (isinstance(margin, list) and len(margin) == 3 and all(_type_ok(m, float) for m in margin)):
        errors.append(f"'head.margin' must be three numbers [m1, m2, m3], got {margin!r}")
    elif not all(math.isfinite(m) for m in margin):
        errors.append(f"'head.margin' must be three finite numbers, got {margin!r}")
    elif not (0 < margin[0] <= MAX_M1 and 0 <= margin[1] < math.pi / 2 and 0 <= margin[2] <= MAX_M3):
        errors.append(f"'head.margin' {margin} out of range: need 0 < m1 <= {MAX_M1}, 0 <= m2 < pi/2, "
                      f"0 <= m3 <= {MAX_M3}")
    if not 0 < cfg.head.scale <= MAX_SCALE:
        errors.append(f"'head.scale' must be in (0, {MAX_SCALE}], got {cfg.head.scale}")
    if cfg.optimizer.name not in OPTIMIZERS:
        errors.append(f"'optimizer.name' is {cfg.optimizer.name!r}; valid: {', '.join(OPTIMIZERS)}")
    if not 0 < cfg.optimizer.lr <= MAX_LR:
        errors.append(f"'optimizer.lr' must be in (0, {MAX_LR}], got {cfg.optimizer.lr}")
    if not 0 <= cfg.optimizer.momentum < 1:
        errors.append(f"'optimizer.momentum' must be in [0, 1), got {cfg.optimizer.momentum}")
    if not 0 <= cfg.optimizer.weight_decay <= MAX_WEIGHT_DECAY:
        errors.append(f"'optimizer.weight_decay' must be in [0, {MAX_WEIGHT_DECAY}], got {cfg.optimizer.weight_decay}")
    if not 0 <= cfg.schedule.power <= MAX_POWER:
        errors.append(f"'schedule.power' must be in [0, {MAX_POWER}], got {cfg.schedule.power}")
    if cfg.schedule.epochs < 1:
        errors.append(f"'schedule.epochs' must be >= 1, got {cfg.schedule.epochs}")
    if not 0 <= cfg.schedule.warmup_epochs < cfg.schedule.epochs:
        errors.append(f"'schedule.warmup_epochs' must be in [0, epochs), got {cfg.schedule.warmup_epochs}")
    if cfg.schedule.max_steps is not None and cfg.schedule.max_steps < 1:
        errors.append(f"'schedule.max_steps' must be >= 1 or null, got {cfg.schedule.max_steps}")
    if cfg.schedule.max_nonfinite_steps < 1:
        errors.append(f"'schedule.max_nonfinite_steps' must be >= 1, got {cfg.schedule.max_nonfinite_steps}")
    if cfg.data.streams < 1:
        errors.append(f"'data.streams' must be >= 1, got {cfg.data.streams}")
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
    errors += _check_output_dir(cfg.output.dir)
    errors += _check_eval(cfg.eval)
    return errors


def _check_output_dir(directory: str) -> list[str]:
    """output.dir must be a directory this process can write in, or creatable: tried with a real file,
    because permission bits say nothing for root and nothing about a read-only mount."""
    if not directory:
        return ["'output.dir' must name a directory"]
    path = Path(directory)
    if path.exists() and not path.is_dir():
        return [f"'output.dir' {directory} is a file, not a directory"]
    existing = path
    while not existing.exists():  # the nearest ancestor that exists: where mkdir -p would start
        existing = existing.parent
    if not existing.is_dir():
        return [f"'output.dir' {directory}: {existing} is a file, so the directory cannot be created"]
    try:
        fd, probe = tempfile.mkstemp(prefix=".ds_face_write_test", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        return [f"'output.dir' {directory}: cannot write in {existing} ({err.strerror})"]
    return []


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
    ijb = e.ijb
    if ijb.root:
        if not re.match(r"^[A-Za-z0-9_-]+$", ijb.target or ""):
            errors.append(f"'eval.ijb.target' must be a set name such as IJBC or IJBB, got {ijb.target!r}")
        else:
            from ds_face.ijb_layout import check_layout  # existence only; rank 0 parses them when training starts
            errors += [f"'eval.ijb.root': {problem}" for problem in check_layout(ijb.root, ijb.target)]
    return errors


def _check_arrow(cfg: RunConfig) -> list[str]:
    from ds_face.data.arrow import ON_CORRUPT
    from ds_face.data.shards import ShardError, check_shard_files, read_manifest
    d = cfg.data
    errors = []
    if d.num_workers < 0:
        errors.append(f"'data.num_workers' must be >= 0, got {d.num_workers}")
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
