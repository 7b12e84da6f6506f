"""Both config files are checked before any process group starts, with one message naming file and key."""
import json
from pathlib import Path

import pytest

import yaml

from ds_face.config import BatchLayout, ConfigError, check_together, load_ds_config, load_run_config
from ds_face.schedule import PolyWarmup
from tests.test_arrow_loader import write_shards

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
    assert layout.per_step == raw["train_micro_batch_size_per_gpu"] * raw.get("gradient_accumulation_steps", 1) * 8


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
    with pytest.raises(ConfigError, match=r"'head.num_classes' must be int, got '1000'"):
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
    assert load_ds_config(path, 2)[1].per_step == 128
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
