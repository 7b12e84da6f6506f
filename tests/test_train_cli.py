"""The real thing: `deepspeed --num_gpus 2 --module ds_face.train ...`, as a user launches it."""
from tests.conftest import ROOT, encode, face, launch


def test_two_rank_zero2_partial_fc_run_logs_and_writes_tensorboard(tmp_path):
    out = tmp_path / "run"
    proc = launch("--config", "configs/cpu_demo.yaml", "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json",
                  "--set", "schedule.max_steps=6", "--set", "output.log_every=3", "--set", f"output.dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "training.log").read_text()
    assert "world size 2, ZeRO stage 2, fp32" in log
    assert "Global Step: 3/6" in log and "Global Step: 6/6" in log
    assert "samples/sec" in log and "LearningRate" in log and "ETA" in log
    assert "[rank 1]" not in log, "only rank 0 writes progress"
    import datetime
    import json
    stamp = log.splitlines()[0].split(" [rank 0] ")[0]
    datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S")  # lines carry the date
    # the effective configuration, once, in the log and as files that load back as they were
    from ds_face.config import load_ds_config, load_run_config
    cfg = load_run_config(out / "config.yaml")
    assert (cfg.schedule.max_steps, cfg.output.log_every, cfg.output.dir) == (6, 3, str(out)), "with the --set"
    assert cfg == load_run_config("configs/cpu_demo.yaml", {"schedule.max_steps": 6, "output.log_every": 3,
                                                            "output.dir": str(out)})
    assert json.loads((out / "ds_config.json").read_text()) == load_ds_config("ds_configs/cpu_zero2_fp32.json", 2)[0]
    assert log.count(f"run config ({out / 'config.yaml'}):") == 1
    assert "  max_steps: 6" in log and log.count("DeepSpeed config (") == 1
    assert not list(out.glob("*.partial"))
    # warnings nobody can act on are gone (ds_face/runtime/quiet.py), from every rank
    assert "all_gather_into_tensor" not in proc.stderr and "untested optimizer" not in proc.stdout
    assert "shm_comm_op built successfully" not in proc.stdout + proc.stderr
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    scalars = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in scalars.Scalars("train/loss")] == [3, 6]


def test_config_error_stops_every_rank_with_one_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs/cpu_demo.yaml").read_text().replace("sample_rate: 0.1", "sample_rate: 1.5"))
    proc = launch("--config", str(bad), "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json", timeout=120)
    assert proc.returncode != 0
    assert f"{bad}: invalid run config:" in proc.stderr
    assert "'head.sample_rate' must be in (0, 1], got 1.5" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_recordio_to_arrow_to_two_rank_training(tmp_path):
    """The whole data path as a user runs it: an InsightFace .rec, rec2arrow, then training on the shards."""
    import numpy as np

    from data_prep import rec2arrow
    from data_prep.recordio import write_insightface_rec
    rng = np.random.default_rng(0)
    images = [(i % 40, encode(face(i % 40, rng), "JPEG", quality=90)) for i in range(320)]
    write_insightface_rec(tmp_path / "rec", images)
    assert rec2arrow.main([str(tmp_path / "rec"), str(tmp_path / "arrow"), "--workers", "1", "--shards", "4"]) == 0
    out = tmp_path / "run"
    proc = launch("--config", "configs/cpu_demo.yaml", "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json",
                  "--set", "data.source=arrow", "--set", f"data.path={tmp_path / 'arrow'}",
                  "--set", "data.num_workers=1", "--set", "head.num_classes=40", "--set", "schedule.epochs=2",
                  "--set", "output.log_every=1", "--set", f"output.dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "training.log").read_text()
    assert "2 epoch(s) of 320 samples; at sample 0 (step 0), 10 steps to go, 10 in all" in log  # 640 / (32 x 2)
    assert "Global Step: 10/10" in log and "Epoch: 1" in log
