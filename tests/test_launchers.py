"""torchrun and accelerate launch start the same 2-rank CPU training as the deepspeed runner (real launches), and
neither rebuilds DeepSpeed's shm op that `make setup` built into the venv (ds_face/runtime/op_cache.py)."""
import os
import sys
from pathlib import Path

from ds_face.runtime.op_cache import built_library
from ds_face.runtime.spawn import free_port, run_command

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRAIN = ["ds_face.train", "--config", "configs/cpu_demo.yaml", "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json",
         "--set", "schedule.max_steps=3", "--set", "output.log_every=1"]


def run(cmd, out):
    proc = run_command([*cmd, "--set", f"output.dir={out}"], cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "training.log").read_text()
    assert "world size 2, ZeRO stage 2, fp32" in log
    assert "Global Step: 3/3" in log
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_3"
    assert {p.name for p in (out / "checkpoints" / "step_3").glob("head_rank*_of2.pt")} == \
        {"head_rank0_of2.pt", "head_rank1_of2.pt"}, "the head is sharded over both ranks"
    return [line.split("Loss ")[1].split()[0] for line in log.splitlines() if "Loss " in line]


def test_torchrun_and_accelerate_launch_run_the_same_two_rank_training(tmp_path):
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", *TRAIN]
    # accelerate: --multi_gpu picks its torchrun-style launcher (2 processes, RANK/LOCAL_RANK/WORLD_SIZE set);
    # without a GPU it starts CPU processes, and ds_face.train brings its own DeepSpeed engine and JSON.
    # (--cpu would pick the single-process launcher.)
    accelerate = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                  "--module", *TRAIN]
    built = built_library()  # None before the first CPU launch of a venv that `make setup` did not set up
    stamp = built and os.stat(built).st_mtime_ns
    losses = run(torchrun, tmp_path / "torchrun")
    assert len(losses) == 3
    assert run(accelerate, tmp_path / "accelerate") == losses, "same seed, same data: the same losses"
    if built:
        assert os.stat(built).st_mtime_ns == stamp, "a launch rebuilt DeepSpeed's shm op"
