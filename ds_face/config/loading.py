"""Reading the two files: the run YAML (with ``--set`` overrides) into a ``RunConfig``, the DeepSpeed JSON into a
dict and its ``BatchLayout``; each checked (``ds_face.config.checks``) before it is returned.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from ds_face.config.bounded import MAX_SET_VALUE_BYTES, parse_json, parse_yaml, read_bounded
from ds_face.config.checks import check_ds_json, check_ds_layout, check_run
from ds_face.config.schema import NUMBER, ConfigError, RunConfig, accepts_float, type_name, type_ok
from ds_face.data.order import BatchLayout

_KEY_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")

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
        shown = pair if len(pair) <= 100 else f"{pair[:80]}...({len(pair)} characters)"
        if len(text.encode()) > MAX_SET_VALUE_BYTES:
            raise ConfigError(f"--set {shown!r}: the value is longer than {MAX_SET_VALUE_BYTES} bytes")
        try:
            value = parse_yaml(text)
        except (yaml.YAMLError, ValueError) as err:
            raise ConfigError(f"--set {shown!r}: the value is not valid YAML ({_first_line(err)})") from None
        if isinstance(value, str) and NUMBER.match(value.strip()):
            value = float(value) if any(c in value for c in ".eE") else int(value)
        overrides[key] = value
    return overrides


def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    path = Path(path)
    raw = _read(path, "YAML")
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
        errors += _resolve_num_classes(cfg)
    if not errors:
        errors += check_run(cfg)
    if errors:
        raise ConfigError(f"{path}: " + "\n  ".join(["invalid run config:"] + errors))
    return cfg


def load_ds_config(path: str | Path, world_size: int | None) -> tuple[dict, BatchLayout]:
    """The DeepSpeed JSON, type-checked; ``world_size=None`` (before launch: not known yet) skips the checks
    that need it."""
    path = Path(path)
    ds = _read(path, "JSON")
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(ds).__name__}")
    errors = check_ds_json(ds)
    if errors:  # the checks below assume the types are right
        raise ConfigError(f"{path}: " + "\n  ".join(["invalid DeepSpeed config:"] + errors))
    errors, layout = check_ds_layout(ds, world_size)
    if errors:
        raise ConfigError(f"{path}: " + "\n  ".join(["invalid DeepSpeed config:"] + errors))
    return ds, layout


def _resolve_num_classes(cfg: RunConfig) -> list[str]:
    """``head.num_classes: auto``: the class count of ``data.path``'s manifest.json (Arrow data only), set in
    ``cfg`` before the checks (and so in the effective config a run records)."""
    value = cfg.head.num_classes
    if not isinstance(value, str):
        return []
    if value != "auto":
        return [f"'head.num_classes' must be a positive integer or auto, got {value!r}"]
    if cfg.data.source != "arrow":
        return [f"'head.num_classes' is auto, which reads the class count from an Arrow dataset's manifest.json "
                f"(data.source: arrow); data.source {cfg.data.source!r} has none: give the number of classes"]
    if not cfg.data.path:
        return ["'head.num_classes' is auto, but 'data.path' is empty: it must name the directory written by "
                "data_prep (rec2arrow or folder2arrow), whose manifest.json holds the class count"]
    from ds_face.data.shards import ShardError, read_manifest
    try:
        cfg.head.num_classes = read_manifest(cfg.data.path).num_classes
    except ShardError as err:
        return [f"'head.num_classes' is auto, but the class count cannot be read: {err}"]
    return []


def _read(path: Path, kind: str) -> Any:
    """A config file, bounded (``read_bounded``; depth, and no YAML aliases)."""
    text = read_bounded(path)
    if kind == "JSON":
        return parse_json(text, str(path))
    try:
        return parse_yaml(text)
    except (yaml.YAMLError, ValueError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML: {_first_line(err)}{where}") from None


def _first_line(err: Exception) -> str:
    """A YAML error's problem, without PyYAML's multi-line excerpt of the input."""
    problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    return problem[:200]


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
            if isinstance(value, str) and NUMBER.match(value.strip()) and accepts_float(kind):
                value = float(value)  # `lr: 1e-3` (YAML 1.1 reads it as a string)
            if not type_ok(value, kind):
                errors.append(f"'{where}' must be {type_name(kind)}, got {value!r}")
                continue
            if accepts_float(kind) and isinstance(value, int) and abs(value) > 2**53:
                value = math.inf  # an absurd integer in a float field: refused below like inf
            if kind is float or isinstance(value, float):
                value = float(value)
                if not math.isfinite(value):  # NaN passes every `x <= 0` check: refuse it here, for every field
                    errors.append(f"'{where}' must be a finite number, got {raw[key]!r}")
                    continue
            values[key] = value
    return cls(**values)


