"""Both config files are checked before any process group starts, with one message naming file and key."""
import json
from pathlib import Path

import pytest

import yaml

from ds_face.config import BatchLayout, ConfigError, check_together, load_ds_config, load_run_config
from ds_face.training.schedule import PolyWarmup
from tests.conftest import write_shards

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def run_yaml(tmp_path, body):
    return write(tmp_path, "run.yaml", "head:\n  num_classes: 100\ndata:\n  num_samples: 1000\n" + body)


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_load(preset, tmp_path):
    raw = yaml.safe_load(preset.read_text())
    if raw["data"]["source"] == "arrow":  # the dataset is not here: only data.path may be wrong
        with pytest.raises(ConfigError) as err:
            load_run_config(preset)
        problems = str(err.value).split("\n  ")[1:]
        assert len(problems) == 1 and problems[0].startswith("'data.path'") and "manifest.json: not found" in problems[0]
        dataset = write_shards(tmp_path / "ds", 96, 8, num_classes=raw["head"]["num_classes"])
        cfg = load_run_config(preset, {"data.path": str(dataset)})
        check_together(cfg, BatchLayout(4, 1, 2), preset)
        synthetic = load_run_config(preset, {"data.source": "synthetic"})
        assert synthetic.data.num_samples > 1_000_000
    else:
        cfg = load_run_config(preset)
    assert cfg.head.num_classes >= 1


@pytest.mark.parametrize("ds", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_ds_configs_load(ds):
    raw, layout = load_ds_config(ds, world_size=8)
    assert layout.global_batch == raw["train_micro_batch_size_per_gpu"] * raw.get("gradient_accumulation_steps", 1) * 8


def test_unknown_key_named_with_file_and_suggestion(tmp_path):
    path = run_yaml(tmp_path, "model:\n  backbon: r50\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert str(path) in str(err.value) and "unknown key 'model.backbon'" in str(err.value)
    assert "did you mean 'model.backbone'" in str(err.value)


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, "run.yaml", "head:\n  num_classes: 0\n  sample_rate: 1.5\n"
                                       "model:\n  backbone: r51\ndata:\n  num_samples: 10\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    text = str(err.value)
    for expected in ("'head.num_classes' must be >= 1", "'head.sample_rate' must be in (0, 1]",
                     "'model.backbone' is 'r51'"):
        assert expected in text


@pytest.mark.parametrize("rate", ["0", "-0.5", "1.01"])
def test_sample_rate_outside_unit_interval(tmp_path, rate):
    with pytest.raises(ConfigError, match=r"head.sample_rate' must be in \(0, 1\]"):
        load_run_config(run_yaml(tmp_path, ""), {"head.sample_rate": float(rate)})


def test_wrong_type_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'model.embedding_size' must be int, got '512'"):
        load_run_config(run_yaml(tmp_path, ""), {"model.embedding_size": "512"})
    with pytest.raises(ConfigError, match=r"'head.num_classes' must be a positive integer or auto, got '1000'"):
        load_run_config(run_yaml(tmp_path, ""), {"head.num_classes": "1000"})


def test_missing_file_and_bad_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(write(tmp_path, "bad.yaml", "head: [unclosed\n"))
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(write(tmp_path, "bad.json", "{\"train_micro_batch_size_per_gpu\": 4,}"), 1)


def ds_json(tmp_path, **fields):
    return write(tmp_path, "ds.json", json.dumps({"train_micro_batch_size_per_gpu": 32, **fields}))


def test_batch_sizes_must_agree_with_world_size(tmp_path):
    path = ds_json(tmp_path, gradient_accumulation_steps=2, train_batch_size=128)
    assert load_ds_config(path, 2)[1].global_batch == 128
    with pytest.raises(ConfigError) as err:
        load_ds_config(path, 3)
    assert str(path) in str(err.value) and "'train_batch_size' is 128" in str(err.value)
    assert "x world size (3) = 192" in str(err.value)


def test_ds_json_owns_no_optimizer_and_checks_fields(tmp_path):
    with pytest.raises(ConfigError, match="'optimizer': remove it"):
        load_ds_config(ds_json(tmp_path, optimizer={"type": "Adam"}), 1)
    with pytest.raises(ConfigError, match="'fp16' and 'bf16' are both enabled"):
        load_ds_config(ds_json(tmp_path, fp16={"enabled": True}, bf16={"enabled": True}), 1)
    with pytest.raises(ConfigError, match="zero_optimization.stage' must be 0, 1, 2 or 3"):
        load_ds_config(ds_json(tmp_path, zero_optimization={"stage": 4}), 1)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu' must be a positive integer"):
        load_ds_config(write(tmp_path, "ds.json", "{}"), 1)


def test_classes_fewer_than_ranks(tmp_path):
    cfg = load_run_config(run_yaml(tmp_path, ""), {"head.num_classes": 3})
    _, layout = load_ds_config(ds_json(tmp_path), 4)
    with pytest.raises(ConfigError, match=r"head.num_classes \(3\) must be >= world size \(4\)"):
        check_together(cfg, layout, "run.yaml")


def test_poly_schedule_with_warmup():
    # units done (samples, or steps), counted once the step is done: the last step's multiplier is 0
    schedule = PolyWarmup(total=10, warmup=2, power=2.0)
    assert [schedule(done) for done in range(1, 4)] == [0.5, 1.0, pytest.approx((1 - 1 / 8) ** 2)]
    assert schedule(6) == pytest.approx((1 - 4 / 8) ** 2)
    assert schedule(10) == 0.0


def test_arrow_source_checked_against_manifest_and_world_size(tmp_path):
    dataset = write_shards(tmp_path / "ds", 120, 6, num_classes=12)
    path = write(tmp_path, "run.yaml", f"head:\n  num_classes: 100\ndata:\n  source: arrow\n  path: {dataset}\n"
                                       f"  on_corrupt: ignore\n  num_workers: -1\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    text = str(err.value)
    for expected in ("'head.num_classes' is 100, but", "has 12 classes (manifest.json); set head.num_classes: 12",
                     "'data.on_corrupt' is 'ignore'; valid: skip, fail", "'data.num_workers' must be >= 0"):
        assert expected in text
    cfg = load_run_config(path, {"head.num_classes": 12, "data.on_corrupt": "fail", "data.num_workers": 3,
                                 "schedule.epochs": 1})
    check_together(cfg, BatchLayout(4, 1, 2), path)
    check_together(cfg, BatchLayout(4, 1, 7), path)  # no shard count to divide: any world size reads any row
    with pytest.raises(ConfigError, match=r"1 epoch\(s\) of 120 samples are fewer than one optimizer step "
                                          r"\(128 samples\)"):
        check_together(cfg, BatchLayout(32, 2, 2), path)
    with pytest.raises(ConfigError, match="'data.path' must name a directory written by data_prep"):
        load_run_config(path, {"head.num_classes": 12, "data.path": "", "data.on_corrupt": "skip",
                               "data.num_workers": 2})


def test_num_classes_auto_reads_the_manifest(tmp_path):
    dataset = write_shards(tmp_path / "ds", 120, 6, num_classes=12)
    path = write(tmp_path, "run.yaml", f"head:\n  num_classes: auto\ndata:\n  source: arrow\n  path: {dataset}\n")
    cfg = load_run_config(path)
    assert cfg.head.num_classes == 12  # the number, as the trainer and the recorded config.yaml see it
    check_together(cfg, BatchLayout(4, 1, 2), path)
    assert load_run_config(run_yaml(tmp_path, ""), {"head.num_classes": "auto", "data.source": "arrow",
                                                    "data.path": str(dataset)}).head.num_classes == 12  # --set


def test_num_classes_auto_without_a_manifest_names_it(tmp_path):
    empty = tmp_path / "not_converted"
    empty.mkdir()
    with pytest.raises(ConfigError) as err:
        load_run_config(run_yaml(tmp_path, ""), {"head.num_classes": "auto", "data.source": "arrow",
                                                 "data.path": str(empty)})
    assert (f"'head.num_classes' is auto, but the class count cannot be read: {empty / 'manifest.json'}: not found"
            in str(err.value))
    with pytest.raises(ConfigError, match=r"'head.num_classes' is auto, but 'data.path' is empty"):
        load_run_config(run_yaml(tmp_path, ""), {"head.num_classes": "auto", "data.source": "arrow"})


def test_num_classes_auto_refused_for_synthetic_data(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_run_config(run_yaml(tmp_path, ""), {"head.num_classes": "auto"})
    assert ("'head.num_classes' is auto, which reads the class count from an Arrow dataset's manifest.json "
            "(data.source: arrow); data.source 'synthetic' has none: give the number of classes") in str(err.value)


# -- issue 14: numbers finite and sane, the DeepSpeed JSON typed, --set as meant, output.dir writable ---------

from ds_face.config import parse_set_overrides  # noqa: E402

CPU_DEMO = ROOT / "configs" / "cpu_demo.yaml"


@pytest.mark.parametrize("pair,expect", [
    ("optimizer.lr=.nan", r"'optimizer\.lr' must be a finite number, got nan"),
    ("optimizer.lr=.inf", r"'optimizer\.lr' must be a finite number, got inf"),
    ("optimizer.lr=-.inf", r"'optimizer\.lr' must be a finite number, got -inf"),
    ("optimizer.lr=1.0e+30", r"'optimizer\.lr' must be in \(0, 10\.0\], got 1e\+30"),
    ("optimizer.lr=1e400", r"'optimizer\.lr' must be a finite number"),
    ("optimizer.lr=0", r"'optimizer\.lr' must be in \(0, 10\.0\], got 0\.0"),
    ("head.scale=.nan", r"'head\.scale' must be a finite number, got nan"),
    ("head.scale=1e9", r"'head\.scale' must be in \(0, 1024\.0\], got 1000000000\.0"),
    ("schedule.power=.nan", r"'schedule\.power' must be a finite number, got nan"),
    ("schedule.warmup_epochs=.nan", r"'schedule\.warmup_epochs' must be a finite number, got nan"),
    ("head.margin=[1.0, .nan, 0.0]", r"'head\.margin' must be three finite numbers"),
    ("head.margin=[1.0, 0.5, 5.0]", r"'head\.margin' \[1\.0, 0\.5, 5\.0\] out of range: need 0 < m1 <= 10\.0"),
    ("head.sample_rate=.nan", r"'head\.sample_rate' must be a finite number, got nan"),
    ("optimizer.momentum=-5", r"'optimizer\.momentum' must be in \[0, 1\), got -5\.0"),
    ("optimizer.momentum=1", r"'optimizer\.momentum' must be in \[0, 1\), got 1\.0"),
    ("optimizer.weight_decay=-1e-4", r"'optimizer\.weight_decay' must be in \[0, 1\.0\], got -0\.0001"),
    ("optimizer.weight_decay=.inf", r"'optimizer\.weight_decay' must be a finite number, got inf"),
    ("model.dropout=2.0", r"'model\.dropout' must be in \[0, 1\), got 2\.0"),
    ("model.dropout=1", r"'model\.dropout' must be in \[0, 1\), got 1\.0"),
    ("model.backbone.foo=1", r"--set model\.backbone\.foo: 'model\.backbone' is 'r_tiny', not a mapping: it has "
                             r"no key 'foo'"),
    ("optimizer.lr=abc", r"'optimizer\.lr' must be float, got 'abc'"),
])
def test_set_values_out_of_range_are_refused_by_name(pair, expect):
    with pytest.raises(ConfigError, match=expect) as err:
        load_run_config(CPU_DEMO, parse_set_overrides([pair]))
    assert str(err.value).startswith(f"{CPU_DEMO}: invalid run config:")


def test_nan_in_the_yaml_file_is_refused(tmp_path):
    path = run_yaml(tmp_path, "optimizer:\n  lr: .nan\n  momentum: -5\nhead:\n  scale: .nan\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert "'optimizer.lr' must be a finite number, got nan" in str(err.value)


@pytest.mark.parametrize("pair,expect", [
    ("optimizer.lr=1e-3", 0.001), ("optimizer.lr=5E-4", 0.0005), ("optimizer.lr=1.0e-3", 0.001),
    ("optimizer.lr=2", 2.0), ("schedule.max_steps=100", 100), ("schedule.max_steps=null", None),
])
def test_set_takes_what_the_user_means(pair, expect):
    key = pair.split("=")[0].split(".")
    cfg = load_run_config(CPU_DEMO, parse_set_overrides([pair]))
    assert getattr(getattr(cfg, key[0]), key[1]) == expect


def test_a_yaml_1e_minus_3_in_the_file_is_a_number(tmp_path):
    assert load_run_config(run_yaml(tmp_path, "optimizer:\n  lr: 1e-3\n")).optimizer.lr == 0.001


@pytest.mark.parametrize("pair,expect", [
    ("optimizer.lr", r"--set expects KEY=VALUE, got 'optimizer\.lr'"),
    ("=1", r"--set expects KEY=VALUE, got '=1'"),
    ("a..b=1", r"--set 'a\.\.b=1': 'a\.\.b' is not a dotted key"),
    ("head.margin=[1, 2", r"--set 'head\.margin=\[1, 2': the value is not valid YAML"),
])
def test_set_pairs_that_are_not_key_value(pair, expect):
    with pytest.raises(ConfigError, match=expect):
        parse_set_overrides([pair])


def test_train_reports_a_key_under_a_value_not_a_traceback(tmp_path, capsys):
    from ds_face.train import main
    args = ["--config", str(CPU_DEMO), "--deepspeed_config", str(ROOT / "ds_configs/cpu_zero2_fp32.json"),
            "--set", f"output.dir={tmp_path}", "--set", "model.backbone.foo=1"]
    assert main(args) == 2
    assert "--set model.backbone.foo: 'model.backbone' is 'r_tiny', not a mapping" in capsys.readouterr().err


@pytest.mark.parametrize("fields,expect", [
    ({"fp16": 5}, r"'fp16' must be a JSON object \{\.\.\.\}, got 5"),
    ({"zero_optimization": [2]}, r"'zero_optimization' must be a JSON object \{\.\.\.\}, got \[2\]"),
    ({"gradient_clipping": "abc"}, r"'gradient_clipping' must be a finite number >= 0 \(0: off\), got 'abc'"),
    ({"gradient_clipping": float("nan")}, r"'gradient_clipping' must be a finite number >= 0 \(0: off\), got nan"),
    ({"gradient_clipping": -1}, r"'gradient_clipping' must be a finite number >= 0"),
    ({"fp_16": {"enabled": True}}, r"unknown key 'fp_16' \(did you mean 'fp16'\?\)"),
    ({"zero_optimisation": {"stage": 2}}, r"unknown key 'zero_optimisation' \(did you mean 'zero_optimization'\?\)"),
    ({"gradient_acumulation_steps": 2}, r"unknown key 'gradient_acumulation_steps' \(did you mean "
                                        r"'gradient_accumulation_steps'\?\)"),
    ({"fp16": {"enabled": "yes"}}, r"'fp16\.enabled' must be true or false, got 'yes'"),
    ({"fp16": {"enabled": True, "initial_scale_power": 1000}}, r"'fp16\.initial_scale_power' must be an integer "
                                                               r"in \[0, 64\], got 1000"),
    ({"fp16": {"enabled": True, "loss_scale": float("inf")}}, r"'fp16\.loss_scale' must be a finite number"),
    ({"zero_optimization": {"stage": True}}, r"'zero_optimization\.stage' must be 0, 1, 2 or 3, got True"),
    ({"wall_clock_breakdown": "false"}, r"'wall_clock_breakdown' must be true or false, got 'false'"),
    ({"steps_per_print": 0}, r"'steps_per_print' must be a positive integer, got 0"),
])
def test_ds_json_types_and_unknown_keys(tmp_path, fields, expect):
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, **fields}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))  # json writes NaN/Infinity, as a hand-edited file may hold them
    with pytest.raises(ConfigError, match=expect) as err:
        load_ds_config(path, 2)
    assert str(err.value).startswith(f"{path}: invalid DeepSpeed config:")


def test_ds_json_without_world_size_skips_only_the_batch_product(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "train_batch_size": 12}))
    load_ds_config(path, None)
    with pytest.raises(ConfigError, match="'train_batch_size' is 12"):
        load_ds_config(path, 2)


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    for where in (tmp_path / "f", tmp_path / "f" / "run"):
        with pytest.raises(ConfigError, match=rf"'output\.dir' {where}:? .*is a file"):
            load_run_config(CPU_DEMO, {"output.dir": str(where)})


def test_output_dir_that_cannot_be_written(tmp_path):
    import os
    if os.geteuid() == 0:  # permission bits do not stop root: use a read-only file system instead
        where = Path("/proc/ds_face_run")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        where = locked / "run"
    with pytest.raises(ConfigError, match=rf"'output\.dir' {where}: cannot write in {where.parent} "):
        load_run_config(CPU_DEMO, {"output.dir": str(where)})
    load_run_config(CPU_DEMO, {"output.dir": str(tmp_path / "new" / "deep")})  # creatable: fine
    assert not (tmp_path / "new").exists()  # the check leaves nothing behind
