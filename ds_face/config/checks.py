"""What the two files must satisfy: the run config's values (ranges, files, the dataset), the DeepSpeed JSON's keys
and types, and what needs both and the world size. Every problem is returned (or raised) naming its key.
"""
from __future__ import annotations

import difflib
import math
import os
import re
import tempfile
from pathlib import Path

from ds_face.backbones import BACKBONES
from ds_face.config.schema import (
    MAX_LR, MAX_M1, MAX_M3, MAX_POWER, MAX_SCALE, MAX_SEED, MAX_WEIGHT_DECAY, OPTIMIZERS, ConfigError, EvalConfig,
    RunConfig, positive_int, type_ok, HEAD_STORAGES, HEAD_STORAGE_DTYPES)
from ds_face.data.options import DATA_SOURCES, ON_CORRUPT
from ds_face.data.order import BatchLayout


def check_together(cfg: RunConfig, layout: BatchLayout, run_path: str | Path) -> None:
    """Checks that need both files and the world size."""
    errors = []
    if cfg.head.num_classes < layout.world_size:
        errors.append(f"head.num_classes ({cfg.head.num_classes}) must be >= world size ({layout.world_size}): "
                      "every rank owns at least one class centre")
    if cfg.data.source == "synthetic" and cfg.data.num_samples * cfg.schedule.epochs < layout.global_batch:
        errors.append(f"data.num_samples ({cfg.data.num_samples}) x schedule.epochs is smaller than one optimizer "
                      f"step's batch ({layout.global_batch} = micro-batch x accumulation x world size)")
    if cfg.data.source == "arrow":
        from ds_face.data.shards import read_manifest
        manifest = read_manifest(cfg.data.path)  # checked by _check_arrow; read once per process (shards.py)
        if manifest.num_samples * cfg.schedule.epochs < layout.global_batch:
            errors.append(f"data.path {cfg.data.path}: {cfg.schedule.epochs} epoch(s) of {manifest.num_samples} "
                          f"samples are fewer than one optimizer step ({layout.global_batch} samples)")
    for key, wanted, command in (("eval.sets", cfg.eval.sets, "python -m ds_face.eval"),
                                 ("eval.ijb", cfg.eval.ijb.root, "python -m ds_face.eval ijb")):
        if wanted and layout.zero_stage == 3:
            errors.append(f"'{key}' is not supported under ZeRO stage 3 (the backbone's parameters are "
                          "partitioned over the ranks, and evaluation runs on rank 0 alone); use stage 0-2, or "
                          f"evaluate exported checkpoints with {command}")
    if errors:
        raise ConfigError(f"{run_path}: " + "\n  ".join(["invalid run config for this launch:"] + errors))


def check_ds_layout(ds: dict, world_size: int | None) -> tuple[list[str], BatchLayout | None]:
    """A type-checked DeepSpeed JSON's problems for ds_face (no optimizer/scheduler, a batch layout DeepSpeed
    accepts) and that layout; ``world_size=None`` skips the checks that need it."""
    errors, layout = [], None
    for key in ("optimizer", "scheduler"):
        if key in ds:
            errors.append(f"'{key}': remove it; ds_face builds the optimizer and LR schedule from the run YAML "
                          "so that the Partial FC head (outside DeepSpeed) uses the same ones")
    micro = ds.get("train_micro_batch_size_per_gpu")
    accumulation = ds.get("gradient_accumulation_steps", 1)
    if not positive_int(micro):
        errors.append(f"'train_micro_batch_size_per_gpu' must be a positive integer, got {micro!r}")
    if not positive_int(accumulation):
        errors.append(f"'gradient_accumulation_steps' must be a positive integer, got {accumulation!r}")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        errors.append("'fp16' and 'bf16' are both enabled; choose one")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        errors.append(f"'zero_optimization.stage' must be 0, 1, 2 or 3, got {stage!r}")
    if world_size is not None and world_size < 1:
        errors.append(f"world size must be >= 1, got {world_size}")
    if not errors:
        layout = BatchLayout(micro, accumulation, world_size or 1, zero_stage=stage)
        total = ds.get("train_batch_size")
        if total is not None and world_size is not None and total != layout.global_batch:
            errors.append(f"'train_batch_size' is {total}, but train_micro_batch_size_per_gpu ({micro}) x "
                          f"gradient_accumulation_steps ({accumulation}) x world size ({world_size}) = "
                          f"{layout.global_batch}; fix it or drop it and let DeepSpeed compute it")
    return errors, layout


# -- the DeepSpeed JSON's keys and types ----------------------------------------------------------------

# Default deny: the DeepSpeed JSON may hold only these keys, at the top level and inside each section. Every other
# key is refused by name: a misspelt one (DeepSpeed ignores it without a word, so "fp_16" would train in fp32),
# and every DeepSpeed feature ds_face does not drive, among them all that make DeepSpeed read or write files or
# paths of its own (DS_REFUSED). DeepSpeed 0.19.8's names (docs "Config JSON", runtime/config.py, zero/config.py).
BOOL, COUNT, POSITIVE = "true or false", "a whole number >= 0", "a whole number >= 1"
OFFLOAD_DEVICE = ("cpu", "none")  # "nvme" reads and writes swap files under nvme_path: refused
DS_SECTIONS = {  # section -> {key: what its value must be (a dict: a sub-section; None: checked below)}
    "fp16": {"enabled": BOOL, "loss_scale": None, "initial_scale_power": None, "loss_scale_window": None,
             "hysteresis": None, "min_loss_scale": None, "consecutive_hysteresis": None},
    "bf16": {"enabled": BOOL},
    "zero_optimization": {
        "stage": None, "contiguous_gradients": BOOL, "overlap_comm": BOOL, "reduce_scatter": BOOL,
        "allgather_partitions": BOOL, "round_robin_gradients": BOOL, "use_multi_rank_bucket_allreduce": BOOL,
        "ignore_unused_parameters": BOOL, "reduce_bucket_size": POSITIVE, "allgather_bucket_size": POSITIVE,
        "sub_group_size": POSITIVE, "stage3_prefetch_bucket_size": COUNT, "stage3_param_persistence_threshold": COUNT,
        "stage3_model_persistence_threshold": COUNT, "stage3_max_live_parameters": COUNT,
        "stage3_max_reuse_distance": COUNT,
        "offload_optimizer": {"device": OFFLOAD_DEVICE, "pin_memory": BOOL},
        "offload_param": {"device": OFFLOAD_DEVICE, "pin_memory": BOOL}},
}
DS_BOOLS = ("prescale_gradients", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
            "wall_clock_breakdown", "memory_breakdown", "disable_allgather")
DS_POSITIVE_INTS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "steps_per_print")
DS_OTHER = ("gradient_clipping", "gradient_predivide_factor")
DS_KEYS = tuple(DS_SECTIONS) + DS_BOOLS + DS_POSITIVE_INTS + DS_OTHER
# DeepSpeed keys that exist but are refused, with why (a key in neither list is "unknown")
_FILES = "refused: it makes DeepSpeed read or write files or paths of its own"
DS_REFUSED = {
    "optimizer": "remove it; ds_face builds the optimizer and LR schedule from the run YAML so that the Partial FC "
                 "head (outside DeepSpeed) uses the same ones",
    "scheduler": "remove it; ds_face builds the optimizer and LR schedule from the run YAML so that the Partial FC "
                 "head (outside DeepSpeed) uses the same ones",
    "checkpoint": f"{_FILES} (load_universal reads zero/<param>/*.pt; node-local storage, writers); ds_face saves "
                  f"and resumes checkpoints itself (the run YAML's checkpoint section)",
    "nebula": f"{_FILES} (a checkpoint service with its own persistent storage path)",
    "aio": f"{_FILES} (asynchronous I/O for NVMe offload, which ds_face does not allow)",
    "tensorboard": f"{_FILES} (its output_path); ds_face logs to output.dir (output.tensorboard in the run YAML)",
    "wandb": f"{_FILES} (and the network); ds_face logs to output.dir",
    "csv_monitor": f"{_FILES} (its output_path); ds_face logs to output.dir",
    "comet": f"{_FILES} (and the network); ds_face logs to output.dir",
    "flops_profiler": f"{_FILES} (its output_file)",
    "autotuning": f"{_FILES} (results and experiment directories) and launches runs of its own",
    "elasticity": "refused: changes the batch size and world size behind ds_face's back; ds_face resumes on any "
                  "world size itself",
    "data_efficiency": f"{_FILES} (data sampling and routing state); ds_face's loader owns the data order",
    "curriculum_learning": "refused: changes the data behind ds_face's loader; ds_face's loader owns the data order",
    "compression_training": "refused: rewrites the model's layers; not supported by ds_face",
    "activation_checkpointing": "refused: not used by ds_face's backbones; set model.gradient_checkpointing in the "
                                "run YAML",
    "bfloat16": "refused: an old spelling; use 'bf16'",
    "amp": "refused: not supported by ds_face; use 'fp16' or 'bf16'",
    "torch_autocast": "refused: not supported by ds_face; use 'fp16' or 'bf16'",
}
for _name in ("comms_logger", "pipeline", "hybrid_engine", "tensor_parallel", "compile", "timers", "data_types",
              "sparse_attention", "progressive_layer_drop", "eigenvalue", "quantize_training", "weight_quantization",
              "expert_parallel", "sparse_gradients", "dump_state", "dataloader_drop_last", "disable_python_gc",
              "use_data_before_expert_parallelism", "managed_gradient_accumulation", "communication_data_type",
              "seq_parallel_communication_data_type", "gradient_allreduce_op", "log_level", "vocabulary_size"):
    DS_REFUSED.setdefault(_name, "refused: a DeepSpeed feature ds_face does not drive or test")
_ZERO_REFUSED = {"nvme_path": f"{_FILES} (NVMe swap files); offload only to \"cpu\"",
                 "elastic_checkpoint": "refused: changes how DeepSpeed reads its checkpoints; ds_face resumes on "
                                       "any world size itself",
                 "load_from_fp32_weights": "refused: changes how DeepSpeed reads its checkpoints",
                 "pipeline_loading_checkpoint": "refused: changes how DeepSpeed reads its checkpoints",
                 "cpu_offload": "refused: an old spelling; use offload_optimizer: {\"device\": \"cpu\"}"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _not_allowed(key: str, where: str, allowed, refused: dict) -> str:
    """One line for a key outside the allow-list: why, if DeepSpeed knows it; else the closest allowed key."""
    if key in refused:
        return f"'{where}{key}': {refused[key]}"
    close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
    hint = f"did you mean '{where}{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
    return f"unknown key '{where}{key}' ({hint})"


def _check_section(section: dict, allowed: dict, where: str, errors: list[str]) -> None:
    """The keys of one section against its allow-list and the kind of value each takes (recursive)."""
    for key, value in section.items():
        if key not in allowed:
            errors.append(_not_allowed(key, where, allowed, _ZERO_REFUSED if where.startswith("zero") else {}))
            continue
        kind, name = allowed[key], f"{where}{key}"
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                errors.append(f"'{name}' must be a JSON object {{...}}, got {value!r}")
            else:
                _check_section(value, kind, f"{name}.", errors)
        elif isinstance(kind, tuple) and value not in kind:
            errors.append(f"'{name}' must be one of {', '.join(repr(v) for v in kind)}, got {value!r}")
        elif kind == BOOL and not isinstance(value, bool):
            errors.append(f"'{name}' must be true or false, got {value!r}")
        elif kind in (COUNT, POSITIVE) and not (_is_number(value) and value == int(value)
                                                and value >= (1 if kind == POSITIVE else 0)):
            errors.append(f"'{name}' must be {kind}, got {value!r}")


def check_ds_json(ds: dict) -> list[str]:
    """Problems in a DeepSpeed JSON: keys outside the allow-list (``DS_SECTIONS`` and the top-level scalars;
    misspelt ones with a did-you-mean, DeepSpeed features ds_face refuses with why), sections that are not
    objects, wrong types, NaN, numbers out of range. Each names the key."""
    errors = []
    for key, value in ds.items():
        if key not in DS_KEYS:
            given = f" (given: {', '.join(f'{key}.{k}' for k in list(value)[:5])})" \
                if isinstance(value, dict) and value and key in DS_REFUSED else ""
            errors.append(_not_allowed(key, "", DS_KEYS, DS_REFUSED) + given)
    for key, allowed in DS_SECTIONS.items():
        if key in ds and not isinstance(ds[key], dict):
            errors.append(f"'{key}' must be a JSON object {{...}}, got {ds[key]!r}")
        elif key in ds:
            _check_section(ds[key], allowed, f"{key}.", errors)
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
    fp16 = ds.get("fp16") if isinstance(ds.get("fp16"), dict) else {}
    for key, ok, want in (
            ("loss_scale", lambda v: _is_number(v) and 0 <= v <= 2.0 ** 64, "a finite number in [0, 2**64] "
                                                                            "(0: dynamic)"),
            ("initial_scale_power", lambda v: _is_int(v) and 0 <= v <= 64, "an integer in [0, 64]"),
            ("loss_scale_window", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
            ("hysteresis", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
            ("min_loss_scale", lambda v: _is_number(v) and 0 < v <= 2.0 ** 64, "a finite number in (0, 2**64]"),
            ("consecutive_hysteresis", lambda v: isinstance(v, bool), "true or false")):
        if key in fp16 and not ok(fp16[key]):
            errors.append(f"'fp16.{key}' must be {want}, got {fp16[key]!r}")
    zero = ds.get("zero_optimization") if isinstance(ds.get("zero_optimization"), dict) else {}
    if "stage" in zero and not (_is_int(zero["stage"]) and zero["stage"] in (0, 1, 2, 3)):
        errors.append(f"'zero_optimization.stage' must be 0, 1, 2 or 3, got {zero['stage']!r}")
    return errors


def check_run(cfg: RunConfig) -> list[str]:
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
    if not (isinstance(margin, list) and len(margin) == 3 and all(type_ok(m, float) for m in margin)):
        errors.append(f"'head.margin' must be three numbers [m1, m2, m3], got {margin!r}")
    elif not all(math.isfinite(m) for m in margin):
        errors.append(f"'head.margin' must be three finite numbers, got {margin!r}")
    elif not (0 < margin[0] <= MAX_M1 and 0 <= margin[1] < math.pi / 2 and 0 <= margin[2] <= MAX_M3):
        errors.append(f"'head.margin' {margin} out of range: need 0 < m1 <= {MAX_M1}, 0 <= m2 < pi/2, "
                      f"0 <= m3 <= {MAX_M3}")
    if cfg.head.storage not in HEAD_STORAGES:
        errors.append(f"'head.storage' must be one of {', '.join(HEAD_STORAGES)}, got {cfg.head.storage!r}")
    if cfg.head.storage_dtype not in HEAD_STORAGE_DTYPES:
        errors.append(f"'head.storage_dtype' must be one of {', '.join(HEAD_STORAGE_DTYPES)}, "
                      f"got {cfg.head.storage_dtype!r}")
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
    if not 0 <= cfg.seed <= MAX_SEED:
        errors.append(f"'seed' must be an integer in [0, {MAX_SEED}], got {cfg.seed}")
    if cfg.schedule.max_skipped_steps < 1:
        errors.append(f"'schedule.max_skipped_steps' must be >= 1, got {cfg.schedule.max_skipped_steps}")
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
    if not (0 <= cfg.checkpoint.every_minutes <= 10**6):  # NaN fails this too
        errors.append(f"'checkpoint.every_minutes' must be a number of minutes in [0, 1e6], got "
                      f"{cfg.checkpoint.every_minutes}")
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
        if not re.fullmatch(r"[A-Za-z0-9_-]+", ijb.target or ""):
            errors.append(f"'eval.ijb.target' must be a set name such as IJBC or IJBB, got {ijb.target!r}")
        else:
            from ds_face.config.ijb_layout import check_layout  # existence only; rank 0 parses them when training starts
            errors += [f"'eval.ijb.root': {problem}" for problem in check_layout(ijb.root, ijb.target)]
    return errors


def _check_arrow(cfg: RunConfig) -> list[str]:
    from ds_face.data.shards import ShardError, check_shard_files, read_manifest
    d = cfg.data
    errors = []
    if d.num_workers < 0:
        errors.append(f"'data.num_workers' must be >= 0, got {d.num_workers}")
    if d.on_corrupt not in ON_CORRUPT:
        errors.append(f"'data.on_corrupt' is {d.on_corrupt!r}; valid: {', '.join(ON_CORRUPT)}")
    if not d.path:
        return errors + ["'data.path' must name a directory written by data_prep (rec2arrow or folder2arrow)"]
    if not d.cache_gb > 0:
        errors.append(f"'data.cache_gb' must be > 0, got {d.cache_gb}")
    if not d.store_outage_minutes > 0:
        errors.append(f"'data.store_outage_minutes' must be > 0, got {d.store_outage_minutes}")
    try:
        manifest = read_manifest(d.path)
        check_shard_files(manifest, d.path, full_hash=d.verify_sha256)  # sizes (and hashes) before any rank
    except ShardError as err:
        return errors + [f"'data.path': {err}"]
    if manifest.num_classes != cfg.head.num_classes:
        errors.append(f"'head.num_classes' is {cfg.head.num_classes}, but {d.path} has {manifest.num_classes} "
                      f"classes (manifest.json); set head.num_classes: {manifest.num_classes} (or auto)")
    if list(manifest.image_size) != [112, 112]:
        errors.append(f"{d.path} holds {manifest.image_size[1]}x{manifest.image_size[0]} images; the IResNet "
                      f"backbones take 112x112 aligned faces")
    return errors
