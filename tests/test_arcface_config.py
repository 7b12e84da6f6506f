"""`python -m ds_face.arcface_config from-arcface`: arcface_torch config modules (written here in arcface_torch's shape:
a base.py of defaults, then `config.KEY = value` files) become a run YAML + DeepSpeed JSON that ds_face's own
loaders accept; every key is accounted for; the module is parsed, never run. Real subprocesses."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ds_face.config import check_together, load_ds_config, load_run_config

ROOT = Path(__file__).resolve().parents[1]

BASE = """from easydict import EasyDict as edict

# the defaults every config starts from
config = edict()

# Margin Base Softmax
config.margin_list = (1.0, 0.5, 0.0)
config.network = "r50"
config.resume = False
config.save_all_states = False
config.output = "ms1mv3_arcface_r50"
config.embedding_size = 512

# Partial FC
config.sample_rate = 1
config.interclass_filtering_threshold = 0

config.fp16 = False
config.batch_size = 128

config.optimizer = "sgd"
config.lr = 0.1
config.momentum = 0.9
config.weight_decay = 5e-4

config.verbose = 2000
config.frequent = 10
config.dali = False
config.gradient_acc = 1
config.seed = 2048
config.num_workers = 2
"""

GLINT_R100 = """from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)
config.network = "r100"
config.resume = False
config.output = None
config.embedding_size = 512
config.sample_rate = 0.2
config.fp16 = True
config.momentum = 0.9
config.weight_decay = 1e-4
config.batch_size = 64
config.gradient_acc = 2
config.lr = 0.2
config.verbose = 1000
config.dali = False

config.rec = "{rec}"
config.num_classes = {classes}
config.num_image = 17091657
config.num_epoch = 20
config.warmup_epoch = 2
config.val_targets = ['lfw', 'cfp_fp']
"""

SYNTHETIC_ADAMW = """from easydict import EasyDict as edict

config = edict()
config.network = "r18"
config.embedding_size = 256
config.sample_rate = 0.1
config.fp16 = False
config.optimizer = "adamw"
config.lr = 0.001
config.weight_decay = 0.1
config.batch_size = 32
config.rec = "synthetic"
config.num_classes = 1000
config.num_image = 20000
config.num_epoch = 2
config.warmup_epoch = 0
config.val_targets = []
config.using_wandb = False
config.some_fork_key = 3
"""


def convert(config_py, out_dir, *extra):
    run, ds = out_dir / "run.yaml", out_dir / "ds.json"
    proc = subprocess.run([sys.executable, "-m", "ds_face.arcface_config", "from-arcface", str(config_py), "--out", str(run),
                           "--ds-out", str(ds), *map(str, extra)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    return proc, run, ds


@pytest.fixture
def arrow_with_bins(tmp_path):
    """Real Arrow shards of 40 classes, with the .bin sets rec2arrow would have carried over."""
    from tests.test_arrow_loader import write_shards
    from tests.test_eval import write_bin
    arrow = write_shards(tmp_path / "glint-arrow", 120, 3, num_classes=40)
    for name in ("lfw", "cfp_fp"):
        write_bin(Path(arrow) / f"{name}.bin", 10)
    return Path(arrow)


def test_an_arcface_config_over_base_py_becomes_a_valid_pair(tmp_path, arrow_with_bins):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "base.py").write_text(BASE)
    (configs / "glint360k_r100.py").write_text(GLINT_R100.format(rec="/train_tmp/glint360k", classes=40))
    proc, run, ds = convert(configs / "glint360k_r100.py", tmp_path, "--data", arrow_with_bins, "--zero-stage", 2)
    assert proc.returncode == 0, proc.stderr
    cfg = load_run_config(run)  # ds_face's own loader: shards, .bin sets, ranges, backbone name
    ds_config, layout = load_ds_config(ds, 4)
    check_together(cfg, layout, run)
    assert (cfg.model.backbone, cfg.model.embedding_size) == ("r100", 512)
    assert (cfg.head.num_classes, cfg.head.sample_rate, cfg.head.margin) == (40, 0.2, [1.0, 0.0, 0.4])
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == \
        ("sgd", 0.2, 0.9, 1e-4)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (20, 2)
    assert (cfg.data.source, cfg.data.path, cfg.data.num_workers) == ("arrow", str(arrow_with_bins), 2)
    assert cfg.eval.sets == [f"{arrow_with_bins}/lfw.bin", f"{arrow_with_bins}/cfp_fp.bin"]
    assert cfg.eval.every_steps == 1000 and cfg.output.log_every == 10 and cfg.seed == 2048
    assert cfg.output.dir == "work_dirs/glint360k_r100", "output None: arcface_torch's work_dirs/<config name>"
    assert (layout.micro_batch, layout.accumulation) == (64, 2)
    assert ds_config["fp16"]["enabled"] is True and ds_config["fp16"]["initial_scale_power"] == 16
    assert ds_config["zero_optimization"] == {"stage": 2} and ds_config["gradient_clipping"] == 5.0
    out = proc.stdout
    assert "from " + str(configs / "base.py") + " + " + str(configs / "glint360k_r100.py") in out
    assert "  network = 'r100' -> model.backbone" in out
    assert "  gradient_acc = 2 -> DeepSpeed gradient_accumulation_steps" in out
    for unmapped in ("resume = False:", "save_all_states = False:", "interclass_filtering_threshold = 0:",
                     "dali = False:", "num_image = 17091657: the Arrow manifest counts the samples"):
        assert "\n  " + unmapped in out.split("not mapped:")[1]
    assert f"python -m data_prep.rec2arrow /train_tmp/glint360k {arrow_with_bins}" in out
    assert "not there yet" not in out and "holds no Arrow shards" not in out


def test_synthetic_adamw_config_and_unknown_keys(tmp_path):
    (tmp_path / "synth.py").write_text(SYNTHETIC_ADAMW)  # no base.py beside it: read alone
    proc, run, ds = convert(tmp_path / "synth.py", tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = load_run_config(run)
    _, layout = load_ds_config(ds, 2)
    check_together(cfg, layout, run)
    assert (cfg.data.source, cfg.data.num_samples) == ("synthetic", 20000)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("adamw", 0.001, 0.1)
    assert (cfg.model.backbone, cfg.model.embedding_size, cfg.head.sample_rate) == ("r18", 256, 0.1)
    assert cfg.head.margin == [1.0, 0.5, 0.0], "not set: ds_face's default, ArcFace as arcface_torch's base"
    assert "fp16" not in json.loads(ds.read_text()) and layout.micro_batch == 32
    assert "  some_fork_key = 3: unknown to ds_face" in proc.stdout
    assert "  using_wandb = False: ds_face logs to tensorboard" in proc.stdout


def test_the_module_is_parsed_never_run(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(SYNTHETIC_ADAMW + f"""
import os
os.system("touch {marker}")
config.lr = __import__("os").system("touch {marker}") or 0.1
if True:
    open("{marker}", "w")
""")
    proc, run, _ = convert(tmp_path / "evil.py", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    assert "evil.py line 22: os.system(" in proc.stdout and "(not a 'config.KEY = value' statement)" in proc.stdout
    assert "evil.py line 23: lr = __import__('os').system(" in proc.stdout and "(not a literal" in proc.stdout
    assert "evil.py line 24: if True:" in proc.stdout
    assert load_run_config(run).optimizer.lr == 0.001, "the literal value before the skipped statement"


@pytest.mark.parametrize("text,expect", [
    ("config = edict(\n", "evil.py line 1: not valid Python ("),
    ("x = 1\n", "evil.py: no 'config.KEY = value' statement found"),
    (SYNTHETIC_ADAMW.replace('"r18"', '"mbf"'), "'model.backbone' is 'mbf'; valid: r18, r34, r50, r100, r200, r_tiny"),
    (SYNTHETIC_ADAMW.replace("config.num_classes = 1000\n", ""), "evil.py: config.num_classes is not set"),
    (SYNTHETIC_ADAMW.replace("config.fp16 = False", 'config.fp16 = "yes"'),
     "evil.py: config.fp16 must be True or False, got 'yes'"),
    (SYNTHETIC_ADAMW + "config.margin_list = (1.0, 0.5)\n", "config.margin_list must be (m1, m2, m3), got (1.0, 0.5)"),
    (SYNTHETIC_ADAMW.replace("config.lr = 0.001", "config.lr = 50.0"), "'optimizer.lr' must be in (0, 10.0], got 50.0"),
    (SYNTHETIC_ADAMW.replace("config.batch_size = 32", "config.batch_size = 0"),
     "'train_micro_batch_size_per_gpu' must be a positive integer, got 0"),
    (SYNTHETIC_ADAMW.replace('config.rec = "synthetic"', "config.rec = None"),
     "config.rec must be the dataset directory (train.rec, train.idx) or 'synthetic', got None"),
], ids=["syntax", "no-config", "backbone", "no-classes", "fp16-type", "margin", "lr-range", "batch", "rec"])
def test_bad_configs_are_named_and_nothing_is_written(tmp_path, text, expect):
    (tmp_path / "evil.py").write_text(text)
    proc, run, ds = convert(tmp_path / "evil.py", tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("ds_face.arcface_config from-arcface: error: ")
    assert expect in proc.stderr, proc.stderr
    assert not run.exists() and not ds.exists()


def test_missing_file_and_existing_outputs(tmp_path):
    proc, _, _ = convert(tmp_path / "nope.py", tmp_path)
    assert proc.returncode == 2 and f"{tmp_path / 'nope.py'}: no such file" in proc.stderr
    (tmp_path / "synth.py").write_text(SYNTHETIC_ADAMW)
    (tmp_path / "run.yaml").write_text("mine\n")
    proc, run, ds = convert(tmp_path / "synth.py", tmp_path)
    assert proc.returncode == 2 and "run.yaml exists; pass --overwrite to replace it" in proc.stderr
    assert run.read_text() == "mine\n" and not ds.exists()
    proc, run, ds = convert(tmp_path / "synth.py", tmp_path, "--overwrite")
    assert proc.returncode == 0 and load_run_config(run).head.num_classes == 1000
