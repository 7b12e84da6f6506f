"""Training entry point: ``deepspeed --num_gpus N -m ds_face.train --config run.yaml --deepspeed_config ds.json``.

The command line only: both configs read and checked, the start decided (fresh, ``--resume``, or a restart of
an elastic launch), the process group started, then ``ds_face.training.trainer.Trainer`` runs. torch and
DeepSpeed are imported after the arguments are parsed, so that ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from ds_face.config import ConfigError, check_together, load_ds_config, load_run_config, parse_set_overrides
from ds_face.runtime.progress import log, setup_logging


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ds_face.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run YAML (model, head, data, schedule, output)")
    parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (ZeRO, precision, batch)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config key, e.g. --set schedule.max_steps=20 (repeatable)")
    parser.add_argument("--init-backbone", metavar="PATH",
                        help="start the backbone from this model.pt (arcface_torch state_dict, ds_face.export output)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest complete checkpoint in <output.dir>/checkpoints, "
                             "on any number of ranks (under the elastic launch a restart resumes by itself)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def main(argv=None, on_step=None) -> int:
    """``on_step``: handed to ``Trainer.fit`` (a ``StepReport`` after every optimizer step; tests use it)."""
    args = parse_args(argv)
    from ds_face.checkpoint.files import LATEST, SAVE_DIR, CheckpointError, check_resume, engine_kind, plan_resume, run_identity
    from ds_face.training.recovery import elastic_run_id, record_run_id, should_resume
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    try:  # both files are checked before any process group starts
        cfg = load_run_config(args.config, parse_set_overrides(args.set))
        ds_config, layout = load_ds_config(args.deepspeed_config, world_size)
        check_together(cfg, layout, args.config)
        if args.init_backbone:  # keys and shapes against the config, on the meta device (no weights built)
            from ds_face.training.init_backbone import check_backbone_file
            check_backbone_file(args.init_backbone, cfg.model)
        output_dir = Path(cfg.output.dir)
        checkpoints = output_dir / SAVE_DIR
        run_id = elastic_run_id()
        resume = should_resume(args.resume, output_dir, os.path.lexists(checkpoints / LATEST), run_id)
        if resume and args.init_backbone:
            raise ConfigError("--resume and --init-backbone together: the checkpoint's backbone would replace "
                              "the file's; use one")
        resized = ""
        if resume:  # `latest`, the meta, and the same ZeRO stage, precision and optimizer: one line, not a
            check_resume(checkpoints, run_identity(cfg), engine_kind(ds_config))  # traceback from DeepSpeed later
            # another world size: keep the global batch through the accumulation if it divides
            accumulation, resized = plan_resume(checkpoints, layout.micro_batch, layout.accumulation,
                                                layout.world_size, cfg.checkpoint.keep_global_batch)
            if accumulation != layout.accumulation:
                ds_config = {key: value for key, value in ds_config.items() if key != "train_batch_size"}
                ds_config["gradient_accumulation_steps"] = accumulation
                layout = replace(layout, accumulation=accumulation)
    except (ConfigError, CheckpointError) as err:
        print(f"ds_face.train: error: {err}", file=sys.stderr)
        return 2
    from ds_face.training.trainer import NonFiniteLoss, SkippedSteps, Trainer, record_config
    try:
        setup_logging(rank, output_dir)
        if rank == 0:
            record_config(cfg, ds_config, output_dir)
            if run_id:
                record_run_id(output_dir, run_id)
            # the directories rank 0 writes into later, checked now (a planted link there is named, not followed)
            from ds_face.fileio import real_dir
            if cfg.output.tensorboard:
                real_dir(output_dir / "tensorboard")
            if cfg.eval.sets or cfg.eval.ijb.root:
                real_dir(output_dir / "eval")
    except OSError as err:  # ds_face.fileio's WriteError names the path; a read-only output.dir too
        print(f"ds_face.train: error: {err}", file=sys.stderr)
        return 2
    if resized:
        log.info(resized)

    from ds_face.runtime.dist import collective_timeout, init
    init(timeout=collective_timeout())
    from ds_face.runtime.supervise import watch_sibling_ranks
    dead_siblings = watch_sibling_ranks(rank)
    trainer = Trainer(cfg, ds_config, layout, init_backbone=args.init_backbone)
    step_log = None
    if run_id and rank == 0:
        from ds_face.training.recovery import StepLog
        step_log = StepLog(output_dir)
    if resume:
        try:
            meta = trainer.resume()
        except CheckpointError as err:  # raised on every rank alike
            print(f"ds_face.train: error: {err}", file=sys.stderr)
            return 2
        if step_log is not None:
            step_log.resumed_from(meta, layout.world_size, f"micro-batch {layout.micro_batch} x accumulation "
                                  f"{layout.accumulation}")
    hooks = [hook for hook in (step_log, on_step) if hook is not None]
    from ds_face.data.arrow import DataError
    try:
        trainer.fit(on_step=(lambda report: [hook(report) for hook in hooks]) if hooks else None)
    except (NonFiniteLoss, SkippedSteps, CheckpointError) as err:  # raised on every rank alike
        print(f"ds_face.train: rank {rank}: error: {err}", file=sys.stderr, flush=True)
        from ds_face.runtime.dist import shutdown
        shutdown()
        return 1
    except (DataError, OSError) as err:  # on the rank that read the row or wrote the file; the others see a
        # failed collective. One line here (DataError and ds_face.fileio's WriteError name the shard/row or path)
        print(f"ds_face.train: rank {rank}: error: {err}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as err:  # a failed collective: say which rank died, after the traceback
        from ds_face.runtime.supervise import SETTLE_S
        collective = any(s in str(err) for s in ("gloo", "NCCL", "Connection reset", "Connection closed"))
        dead = dead_siblings(wait=SETTLE_S if collective else 0.0)  # a killed sibling shows its exit late
        if not dead and not collective:
            raise
        import traceback
        traceback.print_exc()
        dead = dead or "a collective failed and no rank on this node died: one on another node probably did"
        print(f"ds_face.train: rank {rank}: error: {dead}; stopping", file=sys.stderr, flush=True)
        return 1
    log.info(f"done: {trainer.global_step} optimizer steps, {trainer.head_optimizer.steps_skipped} skipped")
    from ds_face.runtime.dist import shutdown
    shutdown()
    return 0


def cli() -> None:
    """``python -m ds_face.train`` and the ``ds-face-train`` command."""
    status = main()  # first: --help and argument errors exit here, before torch is imported
    from ds_face.runtime.dist import exit_without_teardown
    exit_without_teardown(status)


if __name__ == "__main__":
    cli()
