"""Turn an InsightFace ``arcface_torch`` config module into a ds_face run YAML + DeepSpeed JSON.

    python -m ds_face.arcface_config from-arcface configs/ms1mv3_r50.py --out run.yaml --ds-out ds.json

An arcface_torch config is Python (``config = edict(); config.network = "r50"; ...``). It is **parsed, never
run**: the file is read with ``ast`` and only ``NAME.KEY = <literal>`` statements are taken, their values
through ``ast.literal_eval`` (numbers, strings, tuples, lists, dicts, booleans, None). Anything else (an
expression, a call, an ``if``) is listed as skipped, with its line. As arcface_torch's ``get_config`` does, a
``base.py`` beside the file is read first and the file's keys override it.

What arcface_torch sets per GPU and what ds_face puts in the DeepSpeed JSON line up: ``batch_size`` is the
micro-batch per device, ``gradient_acc`` the accumulation, ``fp16`` the precision (DeepSpeed's dynamic loss
scale starting at 2**16, window 100: arcface_torch's GradScaler), gradient clipping 5 (arcface_torch clips the
backbone's norm at 5). ZeRO stage 0 is DDP, which arcface_torch uses; ``--zero-stage`` picks another.
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

# arcface_torch key -> where it goes, when it is used; NOT_MAPPED: why a key goes nowhere. Other keys are
# reported as unknown to ds_face.
MAPPED = {
    "network": "model.backbone",
    "embedding_size": "model.embedding_size",
    "num_classes": "head.num_classes",
    "sample_rate": "head.sample_rate",
    "margin_list": "head.margin",
    "optimizer": "optimizer.name",
    "lr": "optimizer.lr",
    "momentum": "optimizer.momentum",
    "weight_decay": "optimizer.weight_decay",
    "num_epoch": "schedule.epochs",
    "warmup_epoch": "schedule.warmup_epochs",
    "rec": "data.source + data.path (the Arrow shards converted from it)",
    "num_image": "data.num_samples (synthetic data)",
    "num_workers": "data.num_workers",
    "val_targets": "eval.sets (<Arrow dir>/<name>.bin: rec2arrow carries the .bin files over)",
    "verbose": "eval.every_steps",
    "frequent": "output.log_every",
    "output": "output.dir",
    "seed": "seed",
    "batch_size": "DeepSpeed train_micro_batch_size_per_gpu",
    "gradient_acc": "DeepSpeed gradient_accumulation_steps",
    "fp16": "DeepSpeed fp16.enabled",
}
NOT_MAPPED = {
    "resume": "pass --resume to ds_face.train / launch.sh",
    "save_all_states": "ds_face checkpoints always hold every state (ZeRO, head shards, data position, RNG)",
    "dali": "no DALI: ds_face streams Arrow shards",
    "dali_aug": "no DALI: ds_face streams Arrow shards",
    "interclass_filtering_threshold": "not implemented in ds_face's Partial FC",
    "loss": "old arcface_torch key; the margin comes from margin_list",
    "using_wandb": "ds_face logs to tensorboard",
    "wandb_key": "ds_face logs to tensorboard",
    "wandb_entity": "ds_face logs to tensorboard",
    "wandb_project": "ds_face logs to tensorboard",
    "wandb_log_all": "ds_face logs to tensorboard",
    "wandb_resume": "ds_face logs to tensorboard",
    "suffix_run_name": "ds_face logs to tensorboard",
    "notes": "ds_face logs to tensorboard",
    "save_artifacts": "ds_face logs to tensorboard",
}
ARCFACE_GRADIENT_CLIP = 5.0  # arcface_torch: clip_grad_norm_(backbone.parameters(), 5)


class ArcfaceConfigError(ValueError):
    pass


def read_arcface_module(path: str | os.PathLike) -> tuple[dict, list[str]]:
    """({key: value} of every ``NAME.KEY = literal`` statement, in order; notes on what was skipped).

    The module is parsed, not executed. Raises ArcfaceConfigError naming the file (and line) when it cannot
    be read or parsed, or sets no key at all."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArcfaceConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ArcfaceConfigError(f"{path}: cannot read it ({err})") from None
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as err:
        raise ArcfaceConfigError(f"{path} line {err.lineno}: not valid Python ({err.msg})") from None
    values: dict = {}
    skipped: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue  # from easydict import EasyDict as edict
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Call)):
            continue  # config = edict()
        targets = node.targets if isinstance(node, ast.Assign) else []
        if len(targets) == 1 and isinstance(targets[0], ast.Attribute) and isinstance(targets[0].value, ast.Name):
            key = targets[0].attr
            try:
                values[key] = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                skipped.append(f"{path.name} line {node.lineno}: {key} = {ast.unparse(node.value)} "
                               f"(not a literal; not evaluated)")
            continue
        skipped.append(f"{path.name} line {node.lineno}: {ast.unparse(node).splitlines()[0][:80]} "
                       f"(not a 'config.KEY = value' statement)")
    if not values:
        raise ArcfaceConfigError(f"{path}: no 'config.KEY = value' statement found; is this an arcface_torch "
                                 f"config (configs/*.py)?")
    return values, skipped


def _expect(values: dict, key: str, kinds, what: str, source: str):
    value = values[key]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ArcfaceConfigError(f"{source}: config.{key} must be {what}, got {value!r}")
    if not isinstance(value, kinds):
        raise ArcfaceConfigError(f"{source}: config.{key} must be {what}, got {value!r}")
    return value


def convert(values: dict, origin: dict[str, str], name: str, arrow_dir: str | None = None,
            zero_stage: int = 0) -> tuple[dict, dict, dict[str, str], list[str]]:
    """(run config dict, DeepSpeed config dict, {key: why it was not used}, notes) from arcface_torch ``values``.

    ``origin[key]``: the file that set it, for messages; ``name``: the config's stem (arcface_torch's default
    output is work_dirs/<name>); ``arrow_dir``: where the Arrow shards of ``rec`` are (default <rec>-arrow)."""
    def where(key):
        return origin.get(key, "?")

    for key in ("network", "num_classes"):
        if key not in values:
            raise ArcfaceConfigError(f"{origin.get('', '?')}: config.{key} is not set (in the file or its base.py)")
    run: dict = {"model": {}, "head": {}, "optimizer": {}, "schedule": {}, "data": {}, "output": {}, "eval": {}}
    notes: list[str] = []
    unused = {key: NOT_MAPPED.get(key, "unknown to ds_face") for key in values if key not in MAPPED}
    run["model"]["backbone"] = _expect(values, "network", str, "a backbone name such as 'r50'", where("network"))
    if "embedding_size" in values:
        run["model"]["embedding_size"] = _expect(values, "embedding_size", int, "an integer", where("embedding_size"))
    classes = values["num_classes"]
    if isinstance(classes, (list, tuple)):  # some forks list classes per dataset
        raise ArcfaceConfigError(f"{where('num_classes')}: config.num_classes is {classes!r}; ds_face needs one "
                                 f"class count")
    run["head"]["num_classes"] = _expect(values, "num_classes", int, "an integer", where("num_classes"))
    if "sample_rate" in values:
        run["head"]["sample_rate"] = float(_expect(values, "sample_rate", (int, float), "a number",
                                                   where("sample_rate")))
    if "margin_list" in values:
        margin = _expect(values, "margin_list", (list, tuple), "(m1, m2, m3)", where("margin_list"))
        if len(margin) != 3:
            raise ArcfaceConfigError(f"{where('margin_list')}: config.margin_list must be (m1, m2, m3), got "
                                     f"{margin!r}")
        run["head"]["margin"] = [float(m) for m in margin]
    for key, target in (("optimizer", "name"), ("lr", "lr"), ("momentum", "momentum"),
                        ("weight_decay", "weight_decay")):
        if key in values:
            run["optimizer"][target] = values[key]
    if "num_epoch" in values:
        run["schedule"]["epochs"] = values["num_epoch"]
    if "warmup_epoch" in values:
        run["schedule"]["warmup_epochs"] = values["warmup_epoch"]
    if "seed" in values:
        run["seed"] = values["seed"]

    rec = values.get("rec")
    if rec == "synthetic":  # arcface_torch's synthetic data: so is ds_face's
        run["data"]["source"] = "synthetic"
        run["data"]["num_samples"] = values.get("num_image", 0)
        arrow = None
    elif isinstance(rec, str) and rec:
        arrow = arrow_dir or rec.rstrip("/") + "-arrow"
        if "num_image" in values:
            unused["num_image"] = "the Arrow manifest counts the samples"
        run["data"]["source"] = "arrow"
        run["data"]["path"] = arrow
        notes.append(f"data: convert the .rec once: python -m data_prep.rec2arrow {rec} {arrow}")
    else:
        raise ArcfaceConfigError(f"{where('rec')}: config.rec must be the dataset directory (train.rec, train.idx) "
                                 f"or 'synthetic', got {rec!r}")
    if "num_workers" in values:
        run["data"]["num_workers"] = values["num_workers"]

    targets = values.get("val_targets", [])
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise ArcfaceConfigError(f"{where('val_targets')}: config.val_targets must be a list of set names, got "
                                 f"{targets!r}")
    if targets and arrow is not None:
        run["eval"]["sets"] = [f"{arrow}/{t}.bin" for t in targets]
        if "verbose" in values:
            run["eval"]["every_steps"] = values["verbose"]
    elif targets:
        unused["val_targets"] = "synthetic data has no .bin sets"
    if "verbose" in values and "every_steps" not in run["eval"]:
        unused["verbose"] = "no evaluation sets"
    if "frequent" in values:
        run["output"]["log_every"] = values["frequent"]
    output = values.get("output")
    run["output"]["dir"] = output if isinstance(output, str) and output else f"work_dirs/{name}"

    fp16 = values.get("fp16", False)
    if not isinstance(fp16, bool):
        raise ArcfaceConfigError(f"{where('fp16')}: config.fp16 must be True or False, got {fp16!r}")
    ds: dict = {
        "train_micro_batch_size_per_gpu": values.get("batch_size", 128),
        "gradient_accumulation_steps": values.get("gradient_acc", 1),
        "gradient_clipping": ARCFACE_GRADIENT_CLIP,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1000000000,
        "wall_clock_breakdown": False,
    }
    if fp16:
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 100,
                      "hysteresis": 2, "min_loss_scale": 1}
    run = {section: body for section, body in run.items() if body != {}}
    return run, ds, unused, notes


def check_outputs(run: dict, ds: dict, run_path: Path, ds_path: Path) -> list[str]:
    """Validate the two dicts with ds_face's own loaders, as files at their final names (written aside first).

    Problems of values (types, ranges, unknown backbone, ...) raise ArcfaceConfigError. Paths that do not
    exist yet (the Arrow shards before the conversion, the .bin sets inside them) are returned as notes."""
    import tempfile

    import yaml

    from ds_face.config import ConfigError, load_ds_config, load_run_config
    missing = []
    data = dict(run.get("data", {}))
    if data.get("source") == "arrow" and not (Path(data["path"]) / "manifest.json").is_file():
        missing.append(f"data.path {data['path']} holds no Arrow shards yet")
        data = {"source": "synthetic", "num_samples": 1}
    sets = run.get("eval", {}).get("sets", [])
    absent = [s for s in sets if not Path(s).is_file()]
    if absent:
        missing.append(f"eval.sets: {', '.join(absent)} not there yet")
    probe = {**run, "data": data, "eval": {**run.get("eval", {}), "sets": [s for s in sets if s not in absent]}}
    with tempfile.TemporaryDirectory() as tmp:
        yaml_file, json_file = Path(tmp) / run_path.name, Path(tmp) / ds_path.name
        yaml_file.write_text(yaml.safe_dump(probe, sort_keys=False))
        json_file.write_text(json.dumps(ds))
        try:
            load_run_config(yaml_file)
            load_ds_config(json_file, None)
        except ConfigError as err:
            message = str(err).replace(str(yaml_file), str(run_path)).replace(str(json_file), str(ds_path))
            raise ArcfaceConfigError(f"the converted config does not pass ds_face's checks (nothing written):\n"
                                     f"{message}") from None
    return missing


def from_arcface(config_py: str, out: str, ds_out: str, arrow_dir: str | None = None, zero_stage: int = 0,
                 overwrite: bool = False) -> str:
    """Convert, validate and write both files (atomically); returns the report to print."""
    import yaml

    from ds_face.fileio import write_atomic
    path = Path(config_py)
    run_path, ds_path = Path(out), Path(ds_out)
    for target in (run_path, ds_path):
        if target.exists() and not overwrite:
            raise ArcfaceConfigError(f"{target} exists; pass --overwrite to replace it (nothing was written)")
        if not target.resolve().parent.is_dir():
            raise ArcfaceConfigError(f"{target}: directory {target.parent} does not exist")
    values, origin, skipped = {}, {"": str(path)}, []
    base = path.with_name("base.py")
    files = [base, path] if base.is_file() and base.resolve() != path.resolve() else [path]
    for file in files:
        found, notes = read_arcface_module(file)
        values.update(found)
        origin.update({key: str(file) for key in found})
        skipped += notes
    run, ds, unused, notes = convert(values, origin, path.stem, arrow_dir, zero_stage)
    missing = check_outputs(run, ds, run_path, ds_path)
    header = (f"# Converted from the arcface_torch config {path}"
              + (f" (over {base})" if len(files) == 2 else "") + " by python -m ds_face.arcface_config from-arcface.\n")
    write_atomic(run_path, (header + yaml.safe_dump(run, sort_keys=False)).encode())
    write_atomic(ds_path, (json.dumps(ds, indent=2) + "\n").encode())

    lines = [f"wrote {run_path} and {ds_path} from {' + '.join(str(f) for f in files)}"]
    lines += [f"  {key} = {values[key]!r} -> {MAPPED[key]}" for key in values if key not in unused]
    if unused:
        lines.append("not mapped:")
        lines += [f"  {key} = {values[key]!r}: {why}" for key, why in unused.items()]
    if skipped:
        lines.append("skipped (not read):")
        lines += [f"  {note}" for note in skipped]
    lines += [f"note: {n}" for n in notes + missing]
    lines.append(f"train: ./launch.sh {run_path} {ds_path}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python -m ds_face.arcface_config from-arcface CONFIG.py --out run.yaml --ds-out ds.json`` (ds_face.arcface_config)."""
    import argparse
    import sys
    parser = argparse.ArgumentParser(prog="ds_face.arcface_config", description="Configuration tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert = commands.add_parser(
        "from-arcface", help="an arcface_torch config module -> run YAML + DeepSpeed JSON",
        description="Turn an InsightFace arcface_torch config (configs/*.py; a base.py beside it is read first, "
                    "as arcface_torch does) into a ds_face run YAML and DeepSpeed JSON. The file is parsed with "
                    "ast, never imported or run. Lists every key mapped, not mapped, and skipped.")
    convert.add_argument("arcface_config", metavar="CONFIG.py", help="e.g. arcface_torch/configs/ms1mv3_r50.py")
    convert.add_argument("--out", required=True, metavar="RUN.yaml", help="the run YAML to write")
    convert.add_argument("--ds-out", required=True, metavar="DS.json", help="the DeepSpeed JSON to write")
    convert.add_argument("--data", metavar="DIR",
                         help="the Arrow shards converted from config.rec (default: <rec>-arrow)")
    convert.add_argument("--zero-stage", type=int, choices=range(4), default=0,
                         help="ZeRO stage (default 0: plain data parallel, as arcface_torch's DDP)")
    convert.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    try:
        print(from_arcface(args.arcface_config, args.out, args.ds_out, args.data, args.zero_stage, args.overwrite))
    except ArcfaceConfigError as err:
        print(f"ds_face.arcface_config from-arcface: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
