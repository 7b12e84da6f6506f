"""The run config's schema: one dataclass per YAML section, with its defaults, the value bounds the checks use,
and the rules for what a field's type accepts. Imports no torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin

OPTIMIZERS = ("sgd", "adamw")  # for the backbone (torch.optim) and the head (ds_face.head.optim)
HEAD_STORAGES = ("device", "host", "disk")  # where the head's state lives (ds_face.head.storage)
HEAD_STORAGE_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    backbone: str = "r50"
    embedding_size: int = 512
    dropout: float = 0.0
    gradient_checkpointing: bool = False


@dataclass
class HeadConfig:
    num_classes: Union[int, str] = 0  # or auto: the count in data.path's manifest.json (data.source: arrow)
    sample_rate: float = 1.0
    margin: list = field(default_factory=lambda: [1.0, 0.5, 0.0])  # (m1, m2, m3); ArcFace m2=0.5
    scale: float = 64.0
    # where this rank's centres and their optimizer state live: device (accelerator memory), host (host memory,
    # rows copied to the device per step) or disk (memory-mapped scratch files in storage_dir: the page cache
    # is the cache); the checkpoint is the same for all three
    storage: str = "device"
    storage_dtype: str = "float32"  # or bfloat16 / float16: stored so, always computed on in float32
    storage_dir: str = ""  # disk storage only: a local disk (NVMe); empty: <output.dir>/head_storage


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
    max_skipped_steps: int = 20  # stop after more optimizer steps than this in a row were skipped (any precision)


@dataclass
class DataConfig:
    source: str = "synthetic"  # one of ds_face.data.options.DATA_SOURCES
    path: str = ""  # arrow: the directory written by data_prep (holds manifest.json)
    num_samples: int = 0  # synthetic only: images per epoch
    num_workers: int = 2  # arrow: DataLoader worker processes per rank (decode, flip)
    streams: int = 16  # shards read at once and mixed into every micro-batch (ds_face.data.order); fixed for a run
    flip: bool = True  # arrow: random horizontal flip
    on_corrupt: str = "skip"  # arrow: an undecodable image is counted and skipped ("skip") or stops the run
    verify_sha256: bool = False  # arrow: before start, hash every shard against manifest.json (sizes: always)
    # arrow in object storage (path: s3://bucket/prefix; credentials from the client's environment, never here):
    cache_dir: str = ""  # this node's shard cache, shared by its ranks (empty: ~/.cache/ds_face/shards)
    cache_gb: float = 100.0  # at most this much of it; at least one optimizer step's shards (checked)
    store_outage_minutes: float = 10.0  # retry an unreachable store this long, then stop (latest is kept)


@dataclass
class OutputConfig:
    dir: str = "work_dirs/run"
    log_every: int = 50
    tensorboard: bool = True


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also save every N optimizer steps (0: only at each epoch's end and at the finish)
    every_minutes: float = 0.0  # also save once this many minutes passed since the last save (0: off); bounds
    # the work a lost node costs, whatever the step time
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
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit; torch's and Python's take any such value


# A number as people write it. YAML 1.1 (PyYAML) reads `1e-3` and `5E4` as strings (it wants `1.0e-3`);
# a float field given such a string takes the number it obviously means.
NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\Z")


def type_ok(value: Any, kind) -> bool:
    if get_origin(kind) is Union:
        return any(type_ok(value, k) for k in get_args(kind))
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def accepts_float(kind) -> bool:
    return kind is float or (get_origin(kind) is Union and float in get_args(kind))


def type_name(kind) -> str:
    if get_origin(kind) is Union:
        return " or ".join(type_name(k) for k in get_args(kind))
    return "null" if kind is type(None) else kind.__name__


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


