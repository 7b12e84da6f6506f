"""Hostile run YAML, --set values and DeepSpeed JSON: each refused in one line naming the file or key, never a
traceback, and with bounded memory (measured: the peak RSS of a real process that reads the input).

The DeepSpeed JSON is default deny: only the keys ds_face drives are allowed, and every DeepSpeed feature that
reads or writes files or paths of its own is refused by name.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ds_face.config import ConfigError, load_ds_config, load_run_config, parse_set_overrides
from ds_face.config.checks import DS_REFUSED

ROOT = Path(__file__).resolve().parents[1]
CPU_DEMO = ROOT / "configs" / "cpu_demo.yaml"
CPU_DS = ROOT / "ds_configs" / "cpu_zero2_fp32.json"

# nine levels of nine aliases: 9**9 = 387,420,489 strings once expanded, from a 369-character value
ALIAS_BOMB = "[" + ", ".join(["&a0 [x,x,x,x,x,x,x,x,x]"] + [f"&a{i} [{','.join(['*a' + str(i - 1)] * 9)}]"
                                                            for i in range(1, 9)]) + "]"
DEEP = 100_000


def peak_rss_mib(code: str, *args: str) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; returns (its peak RSS in MiB, its stderr). The code runs after the
    imports both it and the baseline need, so the figure is what the input cost on top of them."""
    wrapper = ("import resource, sys\nfrom ds_face.config import load_run_config\nfrom ds_face.train import main\n"
               f"{code}\nprint('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK"))
    return peak / 1024, proc.stderr


def train_main(capsys, *args) -> str:
    """``ds_face.train``'s main (it returns before any process group starts): its error, exit code 2 asserted."""
    from ds_face.train import main
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ds_face.train: error:") and "Traceback" not in err, err[-3000:]
    return err.strip()


# -- YAML: no aliases, bounded depth and size --------------------------------------------------------------------

def test_an_alias_bomb_in_a_set_value_is_refused_with_bounded_memory(tmp_path):
    baseline, _ = peak_rss_mib("rc = main(['--config', sys.argv[1], '--deepspeed_config', sys.argv[2], '--set', "
                               "'seed=-1'])", str(CPU_DEMO), str(CPU_DS))
    peak, err = peak_rss_mib("rc = main(['--config', sys.argv[1], '--deepspeed_config', sys.argv[2], '--set', "
                             "'head.margin=' + sys.argv[3]])", str(CPU_DEMO), str(CPU_DS), ALIAS_BOMB)
    line = next(ln for ln in err.splitlines() if ln.startswith("ds_face.train: error:"))
    assert "--set 'head.margin=[&a0 [x,x,x,x,x,x,x,x,x]" in line and "anchors and aliases" in line
    print(f"alias bomb in --set: peak RSS {peak:.0f} MiB, baseline (a refused seed) {baseline:.0f} MiB")
    assert peak - baseline < 20  # it expanded to 3 GB before


def test_an_alias_bomb_in_the_run_yaml_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  backbone: r_tiny\nhead:\n  margin: {ALIAS_BOMB}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: not valid YAML: YAML anchors and aliases .* \(line 4, column"):
        load_run_config(path)
    path.write_text("defaults: &d {lr: 0.1}\noptimizer:\n  <<: *d\n")  # a merge key needs an alias too
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_run_config(path)


@pytest.mark.parametrize("text,expect", [
    ("[" * DEEP + "]" * DEEP, "nested deeper than 32 levels"),
    ("a:\n" + "".join("  " * i + f"b{i}:\n" for i in range(1, 200)), "nested deeper than 32 levels"),
    ("seed: " + "9" * 10_000, "Exceeds the limit"),  # Python refuses to convert it; no traceback
    ("seed: !!python/object/apply:os.system ['touch pwned']", "could not determine a constructor"),
])
def test_deep_or_odd_yaml_is_one_line(tmp_path, text, expect):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expect) as err:
        load_run_config(path)
    assert "\n" not in str(err.value) and not (tmp_path / "pwned").exists()


def test_a_deep_set_value_and_a_huge_one(tmp_path):
    with pytest.raises(ConfigError, match=r"--set 'head\.margin=\[\[\[\[.*\.\.\.\(200012 characters\)': the value "
                                          r"is longer than 65536 bytes"):
        parse_set_overrides(["head.margin=" + "[" * DEEP + "]" * DEEP])
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        parse_set_overrides(["head.margin=" + "[" * 1000 + "]" * 1000])


def test_a_run_yaml_over_the_size_limit_is_refused_unread(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("# padding\n" * 200_000)  # 2 MB
    with pytest.raises(ConfigError, match=r"run\.yaml: larger than 1048576 bytes; too large for a config file"):
        load_run_config(path)


def test_a_fifo_as_config_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "run.yaml"
    os.mkfifo(fifo)
    done = []
    worker = threading.Thread(target=lambda: done.append(_refusal(load_run_config, fifo)), daemon=True)
    worker.start()
    worker.join(10)
    assert done and "not a regular file" in done[0], done


def _refusal(function, *args) -> str:
    try:
        function(*args)
    except ConfigError as err:
        return str(err)
    return "accepted"


# -- the seed ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["-1", str(2**32), str(10**30)])
def test_a_negative_or_huge_seed_is_refused_by_name(tmp_path, capsys, value):
    line = train_main(capsys, "--config", CPU_DEMO, "--deepspeed_config", CPU_DS, "--set", f"output.dir={tmp_path}",
                      "--set", f"seed={value}")
    assert line.endswith(f"'seed' must be an integer in [0, 4294967295], got {value}"), line


# -- DeepSpeed JSON: bounded, and default deny -------------------------------------------------------------------

def write_ds(tmp_path, **sections) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                                "zero_optimization": {"stage": 2}, **sections}))
    return path


def test_a_100000_deep_json_is_one_line_with_bounded_memory(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * DEEP + "]" * DEEP)
    line = train_main(capsys, "--config", CPU_DEMO, "--deepspeed_config", deep, "--set", f"output.dir={tmp_path}")
    assert line == f"ds_face.train: error: {deep}: nested deeper than 32 levels (line 1); not a file ds_face reads"
    baseline, _ = peak_rss_mib("import json")
    peak, _ = peak_rss_mib("from ds_face.config import load_ds_config, ConfigError\ntry:\n"
                           "    load_ds_config(sys.argv[1], None)\nexcept ConfigError:\n    pass", str(deep))
    print(f"100,000-deep DeepSpeed JSON: peak RSS {peak:.0f} MiB, baseline {baseline:.0f} MiB")
    assert peak - baseline < 20


def test_a_10_mb_deepspeed_json_is_refused_unread(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(" " * (10 << 20) + "{}")
    with pytest.raises(ConfigError, match=r"ds\.json: larger than 1048576 bytes"):
        load_ds_config(path, 2)


def test_a_json_with_a_100000_digit_number_is_one_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"train_micro_batch_size_per_gpu": ' + "9" * 100_000 + "}")
    with pytest.raises(ConfigError, match=r"ds\.json: not valid JSON: Exceeds the limit"):
        load_ds_config(path, 2)


@pytest.mark.parametrize("sections,expect", [
    ({"checkpoint": {"load_universal": True}}, "'checkpoint': refused: it makes DeepSpeed read or write files "
                                               "or paths of its own (load_universal reads zero/<param>/*.pt"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp/x"}}},
     "'zero_optimization.offload_optimizer.device' must be one of 'cpu', 'none', got 'nvme'"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "nvme_path": "/tmp/x"}}},
     "'zero_optimization.offload_param.nvme_path': refused: it makes DeepSpeed read or write files"),
    ({"aio": {"block_size": 1048576}}, "'aio': refused: it makes DeepSpeed read or write files"),
    ({"tensorboard": {"enabled": True, "output_path": "/tmp/tb"}}, "'tensorboard': refused: it makes DeepSpeed "
                                                                   "read or write files or paths of its own (its "
                                                                   "output_path); ds_face logs to output.dir"),
    ({"wandb": {"enabled": True}}, "'wandb': refused:"),
    ({"csv_monitor": {"enabled": True, "output_path": "/tmp/csv"}}, "'csv_monitor': refused:"),
    ({"comet": {"enabled": True}}, "'comet': refused:"),
    ({"flops_profiler": {"enabled": True, "output_file": "/tmp/f.txt"}}, "'flops_profiler': refused: it makes "
                                                                        "DeepSpeed read or write files"),
    ({"autotuning": {"enabled": True}}, "'autotuning': refused:"),
    ({"elasticity": {"enabled": True}}, "'elasticity': refused: changes the batch size"),
    ({"data_efficiency": {"enabled": True}}, "'data_efficiency': refused:"),
    ({"compression_training": {}}, "'compression_training': refused:"),
    ({"nebula": {"enabled": True, "persistent_storage_path": "/tmp/n"}}, "'nebula': refused:"),
    ({"comms_logger": {"enabled": True}}, "'comms_logger': refused: a DeepSpeed feature ds_face does not drive"),
    ({"bfloat16": {"enabled": True}}, "'bfloat16': refused: an old spelling; use 'bf16'"),
    ({"zero_optimization": {"stag": 2}}, "unknown key 'zero_optimization.stag' (did you mean "
                                         "'zero_optimization.stage'?)"),
    ({"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}, "'zero_optimization.elastic_checkpoint': "
                                                                      "refused: changes how DeepSpeed reads"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": -5}}, "'zero_optimization.reduce_bucket_size' must "
                                                                    "be a whole number >= 1, got -5"),
    ({"bf16": {"enabled": True, "bf16_optimizer_states": True}}, "unknown key 'bf16.bf16_optimizer_states'"),
    ({"fp16": {"enabled": True, "loss_scale": 1e38}}, "'fp16.loss_scale' must be a finite number in [0, 2**64]"),
    ({"tensorbord": {}}, "unknown key 'tensorbord' (allowed:"),
])
def test_deepspeed_json_is_default_deny(tmp_path, sections, expect):
    path = write_ds(tmp_path, **sections)
    with pytest.raises(ConfigError) as err:
        load_ds_config(path, 2)
    assert expect in str(err.value), str(err.value)
    assert str(err.value).startswith(f"{path}: invalid DeepSpeed config:")


def test_every_refused_section_is_named_and_every_shipped_config_passes(tmp_path):
    for key in DS_REFUSED:
        with pytest.raises(ConfigError, match=f"'{key}': "):
            load_ds_config(write_ds(tmp_path, **{key: {}}), 2)
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        load_ds_config(path, 2)
    ok = write_ds(tmp_path, zero_optimization={"stage": 2, "reduce_bucket_size": 5e8, "overlap_comm": True,
                                               "offload_optimizer": {"device": "cpu", "pin_memory": True}})
    load_ds_config(ok, 2)


def test_load_universal_on_the_command_line_is_refused_before_anything_runs(tmp_path, capsys):
    ds = write_ds(tmp_path, checkpoint={"load_universal": True})
    line = train_main(capsys, "--config", CPU_DEMO, "--deepspeed_config", ds, "--set", f"output.dir={tmp_path}",
                      "--resume")
    assert "'checkpoint': refused: it makes DeepSpeed read or write files" in line


@pytest.mark.parametrize("seed", [0, 20_000, 2**31 - 1, 2**32 - 1])
def test_every_allowed_seed_makes_synthetic_samples(seed):
    """The config allows seeds up to 2**32 - 1; the synthetic source's per-sample seed once overflowed torch's
    64-bit manual_seed from seed ~18,447 on."""
    import numpy as np

    from ds_face.data.synthetic import SyntheticFaces
    batch = SyntheticFaces(10, 40, seed=seed).make(np.array([0, 3]), np.array([0, 39]))
    assert batch["image"].shape == (2, 112, 112, 3) and batch["image"].dtype == torch.uint8
