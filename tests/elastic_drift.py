"""How far a 2 -> 1 resize's losses drift from the uninterrupted run's, step by step.

    python -m tests.elastic_drift [--cut 8] [--steps 30] [--only NAME ...]

A run on 2 ranks saves step ``cut``; one rank resumes it, accumulating 2 micro-batches (the global batch
kept), and trains to ``steps``; the uninterrupted 2-rank run is the reference. At the resize the state is
bit-identical (tests/test_elastic.py) and the first resized step's loss agrees to ~1e-7: each micro-batch
holds the same samples. After it, one rank sums the two micro-batches' gradients in another order than two
ranks' all-reduce, the head's softmax is one matrix product instead of two halves, and these rounding
differences (~1e-7 relative) grow step by step through SGD with momentum. Floating-point order, not a bug.

That holds at ``sample_rate: 1.0``. Below it the loss itself changes at the resize: the head's softmax runs per
micro-step over the gathered micro-batch (16 samples on 2 ranks, 8 on 1 rank accumulating 2) and the centres
drawn for it (from the micro-step's position and its labels, whatever the world size), so the resized run's
micro-steps draw other centres: the same objective, another estimate of it (14% apart at the first resized
step here).

Prints, per condition, the relative loss difference |resized - uninterrupted| / uninterrupted at each step
after the resize, the growth per step, and the first step after the resize where it exceeds 1e-4. Every run is
real (DeepSpeed engines on gloo ranks), configured as ``ds_face.train`` configures one: the run YAML and
DeepSpeed JSON through ``load_run_config``/``load_ds_config``, the resume layout from ``plan_resume``. Not part
of the test run (minutes on 2 cores); tests/test_elastic.py checks the exact part.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

RUN_YAML = """
model: {{backbone: r_tiny, embedding_size: 32}}
head: {{num_classes: 50, sample_rate: {sample_rate}}}
optimizer: {{name: sgd, lr: {lr}}}
schedule: {{epochs: 1, warmup_epochs: 0.2}}
data: {{source: synthetic, num_samples: {samples}}}
output: {{dir: {out}, log_every: 1000000, tensorboard: false}}
seed: 7
"""
DS_JSON = """{{"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 5.0,
 "zero_optimization": {{"stage": {stage}}}, "zero_allow_untested_optimizer": true, "steps_per_print": 1000000000}}"""

BASE = dict(stage=2, lr=0.02, sample_rate=1.0, threads=0)  # threads 0: torch's default (the machine's cores)
CONDITIONS = {  # the base, then one change each
    "base (ZeRO 2, lr 0.02, sample_rate 1.0, default threads)": {},
    "OMP_NUM_THREADS=1": dict(threads=1),
    "ZeRO 3": dict(stage=3),
    "lr 0.1": dict(lr=0.1),
    "sample_rate 0.1": dict(sample_rate=0.1),
}


def write_configs(directory: Path, *, stage: int, lr: float, sample_rate: float, samples: int) -> tuple[Path, Path]:
    """The run YAML (its output.dir inside ``directory``) and the DeepSpeed JSON of one condition."""
    directory.mkdir(parents=True, exist_ok=True)
    run, ds = directory / "run.yaml", directory / "ds.json"
    run.write_text(RUN_YAML.format(sample_rate=sample_rate, lr=lr, samples=samples, out=directory / "out"))
    ds.write_text(DS_JSON.format(stage=stage))
    return run, ds


def gathered(trainer) -> dict:
    """The run's whole state, gathered (a collective): backbone fp32 weights and optimizer state, the loss
    scale, the head's rows and their momentum (this rank's)."""
    from tests.engine_state import gathered_state
    state = gathered_state(trainer.engine)
    scaler = getattr(trainer.engine.optimizer, "loss_scaler", None)
    return {"params": state["params"], "keys": state["state_keys"], "loss_scale": getattr(scaler, "cur_scale", None),
            "head": trainer.head.weight.clone(),
            "head_momentum": {k: v.clone() for k, v in trainer.head_optimizer.state.items()}}


def train(rank: int, world_size: int, run_yaml: str, ds_json: str, max_steps: int | None, resume: bool,
          threads: int, want_state: bool) -> dict:
    """One rank of a run, set up as ``ds_face.train.main`` sets it up. Returns the losses of the steps it ran,
    the resize line, and (``want_state``) the state after the resume, before any step (or after the last)."""
    import torch

    from ds_face.checkpoint.files import SAVE_DIR, plan_resume
    from tests import observe
    from ds_face.config import load_ds_config, load_run_config
    from ds_face.training.trainer import Trainer
    if threads:
        torch.set_num_threads(threads)
    else:  # torch's own default in a fresh process, which run_ranks' 1 thread per rank replaced
        torch.set_num_threads(os.cpu_count())
    cfg = load_run_config(run_yaml, {"schedule.max_steps": max_steps} if max_steps else None)
    ds_config, layout = load_ds_config(ds_json, world_size)
    resized = ""
    if resume:
        from dataclasses import replace
        accumulation, resized = plan_resume(Path(cfg.output.dir) / SAVE_DIR, layout.micro_batch,
                                            layout.accumulation, world_size, cfg.checkpoint.keep_global_batch)
        ds_config = {**ds_config, "gradient_accumulation_steps": accumulation}
        ds_config.pop("train_batch_size", None)
        layout = replace(layout, accumulation=accumulation)
    trainer = Trainer(cfg, ds_config, layout)
    state = None
    if resume:
        trainer.resume()
        state = gathered(trainer) if want_state else None
    steps = observe.fit(trainer)
    if not resume and want_state:
        state = gathered(trainer)
    return {"losses": steps.losses, "resized": resized, "state": state, "step": trainer.global_step}


def resize_runs(directory: Path, conditions: dict[str, dict], *, cut: int, steps: int, threads: int = 0,
                want_state: bool = False, timeout: float = 1800) -> dict[str, dict]:
    """Per condition (``stage``, ``lr``, ``sample_rate``): the uninterrupted 2-rank run to ``steps``, the 2-rank
    run cut at ``cut`` (saving it), and its 1-rank resume to ``steps``: {condition: {"whole": losses, "cut": the
    cut run's result per rank, "resumed": the 1 rank's result}}. The conditions' 2-rank runs share one process
    group, one run after the other, and so do their 1-rank resumes."""
    from ds_face.runtime.spawn import run_ranks

    from tests.conftest import in_turn
    two_ranks, one_rank = {}, {}
    for k, (name, condition) in enumerate(conditions.items()):
        args = dict(**condition, samples=steps * 16)
        whole_run, whole_ds = write_configs(directory / str(k) / "whole", **args)
        cut_run, cut_ds = write_configs(directory / str(k) / "cut", **args)
        two_ranks[f"{name} whole"] = (train, (str(whole_run), str(whole_ds), None, False, threads, False))
        two_ranks[f"{name} cut"] = (train, (str(cut_run), str(cut_ds), cut, False, threads, want_state))
        one_rank[name] = (train, (str(cut_run), str(cut_ds), None, True, threads, want_state))
    deadline = timeout * len(conditions)  # a hang still fails; a busy machine stretches it (spawn.Deadline)
    first = run_ranks(2, in_turn, two_ranks, timeout=deadline)
    resumed = run_ranks(1, in_turn, one_rank, timeout=deadline)[0]
    return {name: {"whole": first[0][f"{name} whole"]["losses"], "cut": [r[f"{name} cut"] for r in first],
                   "resumed": resumed[name]} for name in conditions}


def relative_drift(whole: list[float], resumed: list[float], cut: int) -> list[float]:
    """|resized - uninterrupted| / uninterrupted at each step after the resize (step cut + 1 first)."""
    return [abs(r - w) / abs(w) for w, r in zip(whole[cut:], resumed)]


def growth_per_step(drift: list[float]) -> float:
    """The geometric mean growth of the drift from its first non-zero value to where it first passes 1e-4 (or
    to the last step). Past ~1e-4 it stops growing: the two runs' losses then differ by about as much as
    neighbouring steps' losses do, and the difference wanders instead."""
    start = next((k for k, d in enumerate(drift) if d > 0), None)
    if start is None:
        return 1.0
    end = next((k for k, d in enumerate(drift) if d > 1e-4), len(drift) - 1)
    return (drift[end] / drift[start]) ** (1 / (end - start)) if end > start else 1.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.elastic_drift", description=__doc__.splitlines()[0])
    parser.add_argument("--cut", type=int, default=8, help="the step the 2-rank run saves and 1 rank resumes")
    parser.add_argument("--steps", type=int, default=30, help="the run's length in steps (16 samples each)")
    parser.add_argument("--only", nargs="*", help="conditions to run (default: all)", choices=list(CONDITIONS))
    args = parser.parse_args(argv)
    rows = []
    for name, change in CONDITIONS.items():
        if args.only and name not in args.only:
            continue
        condition = {**BASE, **change}
        threads = condition.pop("threads")
        with tempfile.TemporaryDirectory() as tmp:
            runs = resize_runs(Path(tmp), {name: condition}, cut=args.cut, steps=args.steps, threads=threads)[name]
        drift = relative_drift(runs["whole"], runs["resumed"]["losses"], args.cut)
        over = next((k + 1 for k, d in enumerate(drift) if d > 1e-4), None)
        rows.append((name, drift, over, growth_per_step(drift)))
        print(f"{name}: first resized step {drift[0]:.1e}; growth x{rows[-1][3]:.2f}/step; > 1e-4 "
              f"{f'{over} steps after the resize' if over else 'never'}; per step: "
              + " ".join(f"{d:.0e}" for d in drift), flush=True)
    print(f"\n{os.cpu_count()} cores, cut at step {args.cut} of {args.steps} (2 ranks x 8 -> 1 rank x 8 x 2)\n")
    print("| condition | step +1 | +2 | +4 | +8 | +16 | largest | growth per step to 1e-4 | first step > 1e-4 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, drift, over, growth in rows:
        at = [f"{drift[k - 1]:.1e}" if k <= len(drift) else "" for k in (1, 2, 4, 8, 16)]
        print(f"| {name} | {' | '.join(at)} | {max(drift):.1e} | x{growth:.2f} | {f'+{over}' if over else 'none'} |")
    return 0 if all(math.isfinite(d) for _, drift, _, _ in rows for d in drift) else 1


if __name__ == "__main__":
    raise SystemExit(main())
