"""Training entry point: ``deepspeed --num_gpus N -m ds_face.train --config run.yaml --deepspeed_config ds.json``.

One optimizer step, from batch to update (``micro_step``):

    images --DeepSpeed engine (IResNet, ZeRO)--> local embeddings [B, D]
           --PartialFC (outside the engine)----> all-gather, sampled centres, margin, distributed CE
    engine.backward(loss)      fills the backbone's grads (ZeRO) and the head's sampled-row grads
    engine.step()              backbone update at accumulation boundaries (or skipped on fp16 overflow)
    head_optimizer.step(...)   same boundary, same LR, unscaled by the same loss scale, same skip
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import random
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ds_face.config import (
    BatchLayout, ConfigError, RunConfig, check_together, load_ds_config, load_run_config, parse_set_overrides,
)
from ds_face.runtime.progress import Progress, log, setup_logging

if TYPE_CHECKING:
    import torch

# torch, DeepSpeed and what needs them are imported inside the functions that use them (main: after the
# arguments are parsed), so that `--help` answers in a fraction of a second instead of after 2-5 s of imports.


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ds_face.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="run YAML (model, head, data, schedule, output)")
    parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (ZeRO, precision, batch)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config key, e.g. --set schedule.max_steps=20 (repeatable)")
    parser.add_argument("--init-backbone", metavar="PATH",
                        help="start the backbone from this model.pt (arcface_torch state_dict, ds_face.export.cli output)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest complete checkpoint in <output.dir>/checkpoints, "
                             "on any number of ranks")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="set by the deepspeed launcher")
    return parser.parse_args(argv)


# -- the step ---------------------------------------------------------------------------------------

def model_dtype(engine) -> torch.dtype:
    import torch
    if engine.fp16_enabled():
        return torch.float16
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def loss_scale(engine) -> float:
    """The loss scale the next backward uses (1.0 unless fp16 loss scaling is on)."""
    return float(getattr(engine.optimizer, "loss_scale", 1.0))


class NonFiniteLoss(ArithmeticError):
    """The loss was NaN/inf for schedule.max_nonfinite_steps steps in a row (fp16 overflow skips excepted)."""


class SkippedSteps(ArithmeticError):
    """Optimizer steps are skipped and will go on being skipped: more than schedule.max_skipped_steps in a row,
    a loss scale that is not a finite number > 0, or an fp16 loss scale at its minimum that still overflows."""


def scale_floor(engine) -> float | None:
    """The minimum of a dynamic (fp16) loss scale, if the engine's optimizer has one."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return float(scaler.min_scale) if getattr(scaler, "dynamic", False) else None


@dataclass
class MicroStep:
    loss: torch.Tensor  # detached
    boundary: bool  # an optimizer step was due after this micro-batch
    applied: bool  # ... and both backbone and head took it (False if skipped or not a boundary)
    at_floor: bool = False  # the fp16 loss scale was at its minimum and the gradients still overflowed


def micro_step(engine, head, head_optimizer, batch: dict, lr: float) -> MicroStep:
    import torch

    from ds_face.data.arrow import normalize
    images = batch["image"].to(engine.device, non_blocking=True)
    if images.dtype == torch.uint8:  # loaders ship uint8 [B, H, W, 3]: normalise where the model runs
        images = normalize(images)
    images = images.to(model_dtype(engine))
    labels = batch["label"].to(engine.device, non_blocking=True)
    loss = head(engine(images), labels)
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    scale = loss_scale(engine)  # read before engine.step(), which may change the loss scale
    at_floor = False
    try:
        engine.step()
    except Exception:  # DeepSpeed raises a bare Exception when an overflow finds the scale at its minimum
        floor = scale_floor(engine)
        if floor is None or scale > floor:
            raise
        at_floor = True  # the head still takes its (skipped) step, so every rank runs the same collectives
    engine_applied = engine.was_step_applied() and not at_floor
    applied = boundary and head_optimizer.step(lr, scale, engine_applied=engine_applied)
    return MicroStep(loss.detach(), boundary, applied, at_floor)


# -- wiring -----------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_backbone_optimizer(cfg: RunConfig, backbone: torch.nn.Module) -> torch.optim.Optimizer:
    import torch
    params = [p for p in backbone.parameters() if p.requires_grad]
    opt = cfg.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)


def build_loader(cfg: RunConfig, layout: BatchLayout, rank: int):
    from ds_face.data import ArrowFaces, Loader, SyntheticFaces
    from ds_face.data.order import Layout
    d = cfg.data
    if d.source == "arrow":
        source = ArrowFaces(d.path, seed=cfg.seed, flip=d.flip, on_corrupt=d.on_corrupt)
        workers = d.num_workers
    else:
        source, workers = SyntheticFaces(cfg.head.num_classes, d.num_samples, seed=cfg.seed), 0
    return Loader(source, Layout(layout.micro_batch, layout.accumulation, layout.world_size, rank),
                  streams=d.streams, seed=cfg.seed, num_workers=workers)


class Trainer:
    """Wiring: the engine (backbone), the head and its optimizer, the loader, the LR schedule, and the
    checkpointer that is handed all their states. ``fit()`` is the loop."""

    def __init__(self, cfg: RunConfig, ds_config: dict, layout: BatchLayout, init_backbone: str | None = None):
        import deepspeed
        import torch

        from ds_face.backbones import get_backbone
        from ds_face.checkpoint.manager import SAVE_DIR, Checkpointer
        from ds_face.head import build_head
        from ds_face.checkpoint.stateful import ModuleBuffers, Position, ProcessRNG

        self.cfg, self.layout = cfg, layout
        self.rank = torch.distributed.get_rank()
        self.output_dir = Path(cfg.output.dir)
        seed_everything(cfg.seed)  # same backbone init everywhere; DeepSpeed broadcasts rank 0's anyway

        self.loader = build_loader(cfg, layout, self.rank)
        self.epoch_size = self.loader.epoch_size
        self.total_samples = cfg.schedule.epochs * self.epoch_size  # the run: every sample once per epoch
        if self.total_samples < layout.per_step:
            raise ConfigError(f"the run has no optimizer step: {cfg.schedule.epochs} epoch(s) of {self.epoch_size} "
                              f"samples are fewer than one global batch ({layout.per_step})")
        self.position = Position()

        backbone = get_backbone(cfg.model.backbone, cfg.model.embedding_size, cfg.model.dropout,
                                cfg.model.gradient_checkpointing)
        if init_backbone:  # before the engine, which broadcasts rank 0's weights
            from ds_face.training.init_backbone import load_backbone_file
            load_backbone_file(init_backbone, backbone, cfg.model.backbone)
            log.info(f"backbone initialised from {init_backbone}")
        # No DeepSpeed LR scheduler: the LR is a function of samples seen (SampleSchedule), set every step.
        self.engine, _, _, _ = deepspeed.initialize(
            model=backbone, optimizer=build_backbone_optimizer(cfg, backbone), config=ds_config)
        self.head, self.head_optimizer = build_head(cfg, self.engine.device)
        self.checkpointer = Checkpointer(
            self.output_dir / SAVE_DIR, cfg.checkpoint.keep_last, self.engine,
            sharded={"head": self.head, "head_optimizer": self.head_optimizer},
            replicated={"position": self.position, "data": self.loader},
            per_rank={"rng": ProcessRNG(), "buffers": ModuleBuffers(self.engine.module)},
            rank=self.rank, world_size=layout.world_size)
        self.losses: list[float] = []  # mean loss of each optimizer step this process ran
        self.lrs: list[tuple[int, float]] = []  # (samples seen after the step, its LR), for tests and plots
        self.ledger: list[torch.Tensor] | None = None  # set to [] to record every trained (epoch, row)
        self.dropped = 0  # samples of the last epoch left untrained at the run's end (< one global batch)
        self._saved_step = None  # the step of the newest checkpoint, so that no tag is written twice

    @property
    def global_step(self) -> int:
        return self.position.step

    @property
    def epoch(self) -> int:
        return self.position.samples // self.epoch_size

    def save_checkpoint(self) -> None:
        if self._saved_step == self.position.step:
            return
        l = self.layout
        meta = {"samples_seen": self.position.samples, "epoch": self.epoch, "micro_batch": l.micro_batch,
                "accumulation": l.accumulation, "global_batch": l.per_step, "num_classes": self.head.num_classes,
                "embedding_size": self.head.embedding_size, "backbone": self.cfg.model.backbone,
                "config": asdict(self.cfg)}
        tag = self.checkpointer.save(self.position.step, meta)
        self._saved_step = self.position.step
        log.info(f"saved checkpoint {self.checkpointer.save_dir / tag}")

    def resume(self) -> dict:
        meta = self.checkpointer.load(self.cfg)
        self._saved_step = self.position.step
        return meta

    def describe(self) -> None:
        import torch

        from ds_face.data.order import run_end
        e, l, h = self.engine, self.layout, self.head
        precision = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[model_dtype(e)]
        end = run_end(self.total_samples, self.position.samples, l.per_step)
        log.info(f"world size {l.world_size}, ZeRO stage {e.zero_optimization_stage()}, {precision}, "
                 f"micro-batch {l.micro_batch} x accumulation {l.accumulation} x {l.world_size} ranks = "
                 f"{l.per_step} samples per optimizer step")
        log.info(f"{self.cfg.schedule.epochs} epoch(s) of {self.epoch_size} samples; at sample "
                 f"{self.position.samples} (step {self.position.step}), {(end - self.position.samples) // l.per_step} "
                 f"steps to go, {self.position.step + (end - self.position.samples) // l.per_step} in all"
                 + (f", stopping after step {self.cfg.schedule.max_steps}" if self.cfg.schedule.max_steps else ""))
        log.info(f"Partial FC: {h.num_classes} classes, {h.num_local} on rank 0 ({h.num_local * h.embedding_size * 4 / 2**20:.1f} MiB "
                 f"fp32 weights), sample_rate {h.sample_rate} -> {h.num_sample if h.sample_rate < 1 else h.num_local} "
                 f"centres per rank per step")

    def _skip_cause(self, result: MicroStep, skipped: int, max_skipped: int, loss: float) -> str | None:
        """Why optimizer steps are skipped and will go on being skipped, or None."""
        scale = loss_scale(self.engine)
        if not (math.isfinite(scale) and scale > 0):
            return f"the loss scale is {scale} (expected a finite number > 0: every step with it is skipped)"
        if result.at_floor:
            return (f"the dynamic (fp16) loss scale is at its minimum ({scale_floor(self.engine):g}, "
                    f"fp16.min_loss_scale) and the gradients still overflow, after {skipped} skipped step(s) in a row")
        if skipped > max_skipped:
            return (f"{skipped} optimizer steps in a row were skipped (more than schedule.max_skipped_steps = "
                    f"{max_skipped}; loss scale {scale:g}, loss {loss:.4g})")
        return None

    def fit(self) -> float:
        """Train until the schedule (or ``max_steps``) ends; returns the last logged mean loss."""
        import torch

        from ds_face.checkpoint.manager import LATEST
        from ds_face.data.order import run_end
        from ds_face.runtime.dist import any_rank
        from ds_face.training.schedule import SampleSchedule
        cfg, position, G = self.cfg, self.position, self.layout.per_step
        end = run_end(self.total_samples, position.samples, G)  # the last whole step's end
        schedule = SampleSchedule(cfg.optimizer.lr, end, int(cfg.schedule.warmup_epochs * self.epoch_size),
                                  cfg.schedule.power)
        last_step = position.step + (end - position.samples) // G
        if cfg.schedule.max_steps:
            last_step = min(last_step, cfg.schedule.max_steps)
        progress = None
        if self.rank == 0:
            tb_dir = self.output_dir / "tensorboard" if cfg.output.tensorboard else None
            progress = Progress(last_step, G, cfg.output.log_every, tb_dir, position.step)
        from ds_face.training.callbacks import TrainingEvaluator
        evaluate = TrainingEvaluator(self, progress)  # eval.sets on rank 0, every eval.every_steps and at the end
        step_losses: list[torch.Tensor] = []
        last_loss = float("nan")
        every = cfg.checkpoint.every_steps
        micro = 0
        lr = None
        nonfinite = 0  # consecutive steps whose loss was NaN/inf
        skipped = 0  # consecutive optimizer steps the engine or the head skipped
        # schedule.max_skipped_steps, 20 by default: DeepSpeed's fp16 defaults (first scale 2^16, hysteresis 2,
        # minimum 1) skip at most 17 steps in a row on the way down to the minimum scale; past that, rescaling no
        # longer makes the gradients finite (a NaN state, a static scale that overflows)
        max_skipped = cfg.schedule.max_skipped_steps

        stop = position.samples + max(0, last_step - position.step) * G  # max_steps: nothing read past it
        for batch in self.loader.micro_batches(position.samples, stop):
            if micro == 0:  # a new optimizer step: its LR is the curve at the samples seen once it is done
                lr = schedule.apply(self.engine.optimizer, position.samples + G)
            self.head.reseed(position.samples * self.layout.accumulation + micro)
            if self.ledger is not None:
                self.ledger.append(torch.stack([batch["epoch"], batch["sample"]]))
            result = micro_step(self.engine, self.head, self.head_optimizer, batch, lr)
            step_losses.append(result.loss)
            micro += 1
            if not result.boundary:
                continue
            micro = 0
            epoch_before = self.epoch
            position.step += 1
            position.samples += G
            last_loss = torch.stack(step_losses).mean().item()  # the global batch's: the same on every rank
            overflow_skip = self.engine.fp16_enabled() and not self.engine.was_step_applied()  # fp16's normal way
            nonfinite = 0 if math.isfinite(last_loss) or overflow_skip else nonfinite + 1
            if nonfinite >= cfg.schedule.max_nonfinite_steps:
                raise NonFiniteLoss(f"the loss was {last_loss} for {nonfinite} optimizer step(s) in a row, up to step "
                                    f"{position.step}; stopping (schedule.max_nonfinite_steps). The newest "
                                    f"checkpoint, {self.checkpointer.save_dir / LATEST}, predates it: lower "
                                    f"optimizer.lr, add warm-up or gradient clipping, and --resume")
            skipped = 0 if result.applied else skipped + 1
            why = self._skip_cause(result, skipped, max_skipped, last_loss)
            if any_rank(why is not None, self.engine.device):  # a forged scale may sit on one rank only
                raise SkippedSteps(f"{why or 'on another rank: its loss scale, or the steps it skipped'}, at step "
                                   f"{position.step}; stopping: nothing trains. The newest checkpoint, "
                                   f"{self.checkpointer.save_dir / LATEST}, predates it: lower optimizer.lr, add "
                                   f"warm-up or gradient clipping, or check the loss scale it holds, and --resume")
            self.losses.append(last_loss)
            self.lrs.append((position.samples, lr))
            step_losses.clear()
            if progress is not None:
                progress.update(last_loss, position.step, epoch_before, lr,
                                loss_scale(self.engine) if self.engine.fp16_enabled() else None,
                                self.head_optimizer.steps_skipped)
            evaluate(position.step, last=position.step >= last_step)
            if position.step >= last_step:
                break
            if (every and position.step % every == 0) or self.epoch != epoch_before:  # and at each epoch's end
                self.save_checkpoint()
        if position.samples == end and end < self.total_samples:
            self.dropped = self.total_samples - end
            log.info(f"{self.dropped} samples of the last epoch were not trained: fewer than one global batch "
                     f"({G}) was left")
        self.save_checkpoint()
        if progress is not None:
            progress.close()
        return last_loss


def record_config(cfg: RunConfig, ds_config: dict, output_dir: Path) -> None:
    """Rank 0, once per start: the effective run config (file + ``--set``) and the DeepSpeed config as passed
    to ``deepspeed.initialize``, into training.log and as ``config.yaml`` / ``ds_config.json`` in output.dir
    (written atomically; a resume replaces them with what it runs, the log keeps every start's copy)."""
    import json

    import yaml

    from ds_face.fileio import write_atomic, write_json_atomic
    text = yaml.safe_dump(asdict(cfg), sort_keys=False)
    write_atomic(output_dir / "config.yaml", text.encode())
    write_json_atomic(output_dir / "ds_config.json", ds_config)
    log.info(f"run config ({output_dir / 'config.yaml'}):\n{text.rstrip()}")
    log.info(f"DeepSpeed config ({output_dir / 'ds_config.json'}): {json.dumps(ds_config)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from ds_face.checkpoint.manager import LATEST, SAVE_DIR, CheckpointError, check_resume, engine_kind, plan_resume
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    try:  # both files are checked before any process group starts
        cfg = load_run_config(args.config, parse_set_overrides(args.set))
        ds_config, layout = load_ds_config(args.deepspeed_config, world_size)
        check_together(cfg, layout, args.config)
        if args.init_backbone:  # keys and shapes against the config, on the meta device (no weights built)
            from ds_face.training.init_backbone import check_backbone_file
            check_backbone_file(args.init_backbone, cfg.model)
        checkpoints = Path(cfg.output.dir) / SAVE_DIR
        if args.resume and args.init_backbone:
            raise ConfigError("--resume and --init-backbone together: the checkpoint's backbone would replace "
                              "the file's; use one")
        if args.resume and not os.path.lexists(checkpoints / LATEST):
            raise ConfigError(f"--resume: no complete checkpoint in {checkpoints} ('latest' not found)")
        if not args.resume and os.path.lexists(checkpoints / LATEST):
            raise ConfigError(f"{checkpoints} already holds checkpoints; pass --resume to continue that run, "
                              f"or set another output.dir (nothing was overwritten)")
        resized = ""
        if args.resume:  # `latest`, the meta, and the same ZeRO stage, precision and optimizer: one line, not a
            check_resume(checkpoints, cfg, engine_kind(ds_config))  # traceback from inside DeepSpeed later
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
    try:
        setup_logging(rank, Path(cfg.output.dir))
        if rank == 0:
            record_config(cfg, ds_config, Path(cfg.output.dir))
            # the directories rank 0 writes into later, checked now (a planted link there is named, not followed)
            from ds_face.fileio import real_dir
            if cfg.output.tensorboard:
                real_dir(Path(cfg.output.dir) / "tensorboard")
            if cfg.eval.sets or cfg.eval.ijb.root:
                real_dir(Path(cfg.output.dir) / "eval")
    except OSError as err:  # ds_face.fileio's WriteError names the path; a read-only output.dir too
        print(f"ds_face.train: error: {err}", file=sys.stderr)
        return 2
    if resized:
        log.info(resized)

    from ds_face.runtime.dist import init
    init(timeout=datetime.timedelta(minutes=int(os.environ.get("DS_FACE_TIMEOUT_MIN", 30))))
    from ds_face.runtime.supervise import watch_sibling_ranks
    dead_siblings = watch_sibling_ranks(rank)
    trainer = Trainer(cfg, ds_config, layout, init_backbone=args.init_backbone)
    if args.resume:
        try:
            trainer.resume()
        except CheckpointError as err:  # raised on every rank alike
            print(f"ds_face.train: error: {err}", file=sys.stderr)
            return 2
    trainer.describe()
    from ds_face.data.arrow import DataError
    try:
        trainer.fit()
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
        dead = dead or (f"a collective failed and no rank on this node died (waited {SETTLE_S:g} s for one): one "
                       f"on another node probably did")
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
