"""The two configuration files, read and checked before any process group starts.

* The **run YAML** (``configs/*.yaml``) names backbone, embedding size, head,
  optimizer, schedule, data and output.
* The **DeepSpeed JSON** (``ds_configs/*.json``) alone decides ZeRO stage,
  precision, micro-batch per device, gradient accumulation and clipping.

Nothing is set in both. Every problem found is collected and reported in one
``ConfigError`` that names the file and the key.

Three concerns, one module each: ``schema`` (the dataclasses, their defaults and bounds, what a field's type
accepts), ``loading`` (reading the files, ``--set`` overrides, ``head.num_classes: auto``) and ``checks`` (the
values, the DeepSpeed JSON's keys, what needs both files and the world size). Import from here.
"""
from ds_face.config.checks import DS_KEYS, check_ds_json, check_together
from ds_face.config.loading import load_ds_config, load_run_config, parse_set_overrides
from ds_face.config.schema import (
    HEAD_STORAGE_DTYPES, HEAD_STORAGES, OPTIMIZERS, CheckpointConfig, ConfigError, DataConfig, EvalConfig, HeadConfig, IJBEvalConfig, ModelConfig,
    OptimizerConfig, OutputConfig, RunConfig, ScheduleConfig,
)
from ds_face.data.options import DATA_SOURCES
from ds_face.data.order import BatchLayout

__all__ = [
    "BatchLayout", "CheckpointConfig", "ConfigError", "DATA_SOURCES", "DS_KEYS", "DataConfig", "EvalConfig",
    "HEAD_STORAGES", "HEAD_STORAGE_DTYPES", "HeadConfig", "IJBEvalConfig", "ModelConfig", "OPTIMIZERS", "OptimizerConfig", "OutputConfig", "RunConfig",
    "ScheduleConfig", "check_ds_json", "check_together", "load_ds_config", "load_run_config", "parse_set_overrides",
]
