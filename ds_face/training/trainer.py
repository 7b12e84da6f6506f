"""The Trainer: a batch from the Arrow shard to the optimizer step.

One optimizer step, from batch to update (``micro_step``):

    images --DeepSpeed engine (IResNet, ZeRO)--> local embeddings [B, D]
           --PartialFC (outside the engine)----> all-gather, sampled centres, margin, distributed CE
    engine.backward(loss)      fills the backbone's grads (ZeRO) and the head's sampled-row grads
    engine.step()              backbone update at accumulation boundaries (or skipped on fp16 overflow)
    head_optimizer.step(...)   same boundary, same LR, unscaled by the same loss scale, same skip

``Trainer`` wires the parts (engine, head and its optimizer, loader, LR schedule, checkpoint manager) and
``fit()`` is the loop. The command line that builds it is ``ds_face.train``.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import deepspeed
import numpy as np
import torch

from ds_face.backbones import get_backbone
from ds_face.checkpoint.files import LATEST, SAVE_DIR, run_meta
from ds_face.checkpoint.manager import CheckpointManager
from ds_face.checkpoint.stateful import ModuleBuffers, Position, ProcessRNG
from ds_face.config import BatchLayout, ConfigError, RunConfig
from ds_face.data import ArrowFaces, Loader, SyntheticFaces
from ds_face.data.arrow import normalize
from ds_face.data.order import run_end
from ds_face.fileio import write_atomic, write_json_atomic
from ds_face.head import build_head
from ds_face.runtime.dist import any_rank
from ds_face.runtime.progress import Progress, log
from ds_face.training.callbacks import TrainingEvaluator
from ds_face.training.init_backbone import load_backbone_file
from ds_face.training.schedule import SampleSchedule

# -- the step ---------------------------------------------------------------------------------------


def model_dtype(engine) -> torch.dtype:
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
    images = batch["image"].to(engine.device, non_blocking=True)
    if images.dtype == torch.uint8:  # loaders ship uint8 [B, H, W, 3]: normalise where the model runs
        images = normalize(images)
    images = images.to(model_dtype(engine))
    labels = batch["label"].to(engine.device, non_blocking=True)
    head.prepare(labels)  # picks the step's centres first: reading them from host/disk overlaps the forward
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


@dataclass(frozen=True)
class StepReport:
    """What ``fit(on_step=...)`` is handed after each optimizer step (tests, plots, ledgers)."""
    step: int  # the optimizer step just taken
    samples: int  # samples seen after it
    loss: float  # the global batch's mean loss (the same on every rank)
    lr: float
    world_size: int
    trained: torch.Tensor  # [2, n] int64: the (epoch, row) of every sample this rank trained in the step


@dataclass(frozen=True)
class RunPlan:
    """Where the run goes from its position, computed once per start: the run is every sample once per epoch,
    in whole optimizer steps."""
    total: int  # samples in the run: epochs x epoch size
    end: int  # where the last whole optimizer step ends (samples)
    last_step: int  # the step the loop stops after (schedule.max_steps included)
    dropped: int  # samples of the last epoch that no step trains (fewer than one global batch)


# -- wiring -----------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_backbone_optimizer(cfg: RunConfig, backbone: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in backbone.parameters() if p.requires_grad]
    opt = cfg.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)


def build_loader(cfg: RunConfig, layout: BatchLayout, rank: int) -> Loader:
    d = cfg.data
    if d.source == "arrow":
        source = ArrowFaces(d.path, seed=cfg.seed, flip=d.flip, on_corrupt=d.on_corrupt, cache_dir=d.cache_dir,
                            cache_gb=d.cache_gb, outage_minutes=d.store_outage_minutes)
        workers = d.num_workers
    else:
        source, workers = SyntheticFaces(cfg.head.num_classes, d.num_samples, seed=cfg.seed), 0
    return Loader(source, replace(layout, rank=rank),
                  streams=d.streams, seed=cfg.seed, num_workers=workers)


def record_config(cfg: RunConfig, ds_config: dict, output_dir: Path) -> None:
    """Rank 0, once per start: the effective run config (file + ``--set``) and the DeepSpeed config as passed
    to ``deepspeed.initialize``, into training.log and as ``config.yaml`` / ``ds_config.json`` in output.dir
    (written atomically; a resume replaces them with what it runs, the log keeps every start's copy)."""
    import json

    import yaml
    text = yaml.safe_dump(asdict(cfg), sort_keys=False)
    write_atomic(output_dir / "config.yaml", text.encode())
    write_json_atomic(output_dir / "ds_config.json", ds_config)
    log.info(f"run config ({output_dir / 'config.yaml'}):\n{text.rstrip()}")
    log.info(f"DeepSpeed config ({output_dir / 'ds_config.json'}): {json.dumps(ds_config)}")


class Trainer:
    """Wiring: the engine (backbone), the head and its optimizer, the loader, the LR schedule, and the
    checkpoint manager that is handed all their states. ``resume()`` restores the latest checkpoint; ``fit()``
    is the loop."""

    def __init__(self, cfg: RunConfig, ds_config: dict, layout: BatchLayout, init_backbone: str | None = None):
        self.cfg, self.layout = cfg, layout
        self.rank = torch.distributed.get_rank()
        self.output_dir = Path(cfg.output.dir)
        seed_everything(cfg.seed)  # same backbone init everywhere; DeepSpeed broadcasts rank 0's anyway

        self.loader = build_loader(cfg, layout, self.rank)
        self.epoch_size = self.loader.epoch_size
        if cfg.schedule.epochs * self.epoch_size < layout.global_batch:
            raise ConfigError(f"the run has no optimizer step: {cfg.schedule.epochs} epoch(s) of {self.epoch_size} "
                              f"samples are fewer than one global batch ({layout.global_batch})")
        self.position = Position()

        backbone = get_backbone(cfg.model.backbone, cfg.model.embedding_size, cfg.model.dropout,
                                cfg.model.gradient_checkpointing)
        if init_backbone:  # before the engine, which broadcasts rank 0's weights
            load_backbone_file(init_backbone, backbone, cfg.model.backbone)
            log.info(f"backbone initialised from {init_backbone}")
        # No DeepSpeed LR scheduler: the LR is a function of samples seen (SampleSchedule), set every step.
        self.engine, _, _, _ = deepspeed.initialize(
            model=backbone, optimizer=build_backbone_optimizer(cfg, backbone), config=ds_config)
        self.head, self.head_optimizer = build_head(cfg, self.engine.device)
        self.checkpoints = CheckpointManager(
            self.output_dir / SAVE_DIR, self.engine,
            sharded={"head": self.head, "head_optimizer": self.head_optimizer},
            replicated={"data": self.loader},
            per_rank={"rng": ProcessRNG(), "buffers": ModuleBuffers(self.engine.module)},
            position=self.position, run=run_meta(cfg, layout, self.epoch_size), policy=cfg.checkpoint,
            rank=self.rank, world_size=layout.world_size)

    @property
    def global_step(self) -> int:
        return self.position.step

    @property
    def epoch(self) -> int:
        return self.position.samples // self.epoch_size

    def resume(self) -> dict:
        """Collective: the latest complete checkpoint restored, on any world size; returns its meta."""
        return self.checkpoints.load()

    def plan(self) -> RunPlan:
        """The run from the current position on: its end in whole global batches, and the step it stops after."""
        G = self.layout.global_batch
        total = self.cfg.schedule.epochs * self.epoch_size
        end = run_end(total, self.position.samples, G)
        last_step = self.position.step + (end - self.position.samples) // G
        if self.cfg.schedule.max_steps:
            last_step = min(last_step, self.cfg.schedule.max_steps)
        return RunPlan(total, end, last_step, total - end)

    def describe(self, plan: RunPlan) -> None:
        e, l, h, p = self.engine, self.layout, self.head, self.position
        precision = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[model_dtype(e)]
        to_go = (plan.end - p.samples) // l.global_batch
        log.info(f"world size {l.world_size}, ZeRO stage {e.zero_optimization_stage()}, {precision}, "
                 f"micro-batch {l.micro_batch} x accumulation {l.accumulation} x {l.world_size} ranks = "
                 f"{l.global_batch} samples per optimizer step")
        log.info(f"{self.cfg.schedule.epochs} epoch(s) of {self.epoch_size} samples; at sample {p.samples} "
                 f"(step {p.step}), {to_go} steps to go, {p.step + to_go} in all"
                 + (f", stopping after step {self.cfg.schedule.max_steps}" if self.cfg.schedule.max_steps else ""))
        log.info(f"Partial FC: {h.num_classes} classes, {h.num_local} on rank 0 ({h.store.nbytes() / 2**20:.1f} MiB "
                 f"of centres and optimizer state, {h.store.dtype_name}, on {h.store.storage}), sample_rate "
                 f"{h.sample_rate} -> {'about ' if h.sample_rate < 1 else ''}{h.num_sample} centres per rank per step")

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

    def fit(self, on_step: Callable[[StepReport], None] | None = None) -> float:
        """Train until the schedule (or ``max_steps``) ends; returns the last mean loss. ``on_step``: called on
        every rank after each optimizer step with a ``StepReport``."""
        cfg, position, G = self.cfg, self.position, self.layout.global_batch
        plan = self.plan()
        self.describe(plan)
        schedule = SampleSchedule(cfg.optimizer.lr, plan.end, int(cfg.schedule.warmup_epochs * self.epoch_size),
                                  cfg.schedule.power)
        progress = None
        if self.rank == 0:
            tb_dir = self.output_dir / "tensorboard" if cfg.output.tensorboard else None
            progress = Progress(plan.last_step, G, cfg.output.log_every, tb_dir, position.step)
        evaluator = TrainingEvaluator(cfg.eval, self.rank, self.output_dir / "eval", self.engine.module,
                                      self.engine.device, position.step, getattr(progress, "writer", None))
        step_losses: list[torch.Tensor] = []
        trained: list[torch.Tensor] = []  # (epoch, row) of this step's micro-batches, for on_step
        last_loss = float("nan")
        micro = 0
        lr = None
        nonfinite = 0  # consecutive steps whose loss was NaN/inf
        skipped = 0  # consecutive optimizer steps the engine or the head skipped
        # schedule.max_skipped_steps, 20 by default: DeepSpeed's fp16 defaults (first scale 2^16, hysteresis 2,
        # minimum 1) skip at most 17 steps in a row on the way down to the minimum scale; past that, rescaling no
        # longer makes the gradients finite (a NaN state, a static scale that overflows)
        max_skipped = cfg.schedule.max_skipped_steps
        latest = self.checkpoints.save_dir / LATEST

        stop = position.samples + max(0, plan.last_step - position.step) * G  # max_steps: nothing read past it
        for batch in self.loader.micro_batches(position.samples, stop):
            if micro == 0:  # a new optimizer step: its LR is the curve at the samples seen once it is done
                lr = schedule.apply(self.engine.optimizer, position.samples + G)
            # negatives: a function of the micro-step's first sample in the run (any world size draws the same)
            self.head.set_position(position.samples + micro * self.layout.micro_batch * self.layout.world_size)
            if on_step is not None:
                trained.append(torch.stack([batch["epoch"], batch["sample"]]))
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
            step_losses.clear()
            overflow_skip = self.engine.fp16_enabled() and not self.engine.was_step_applied()  # fp16's normal way
            nonfinite = 0 if math.isfinite(last_loss) or overflow_skip else nonfinite + 1
            if nonfinite >= cfg.schedule.max_nonfinite_steps:
                raise NonFiniteLoss(f"the loss was {last_loss} for {nonfinite} optimizer step(s) in a row, up to step "
                                    f"{position.step}; stopping (schedule.max_nonfinite_steps). The newest "
                                    f"checkpoint, {latest}, predates it: lower optimizer.lr, add warm-up or gradient "
                                    f"clipping, and --resume")
            skipped = 0 if result.applied else skipped + 1
            why = self._skip_cause(result, skipped, max_skipped, last_loss)
            if any_rank(why is not None, self.engine.device):  # a forged scale may sit on one rank only
                raise SkippedSteps(f"{why or 'on another rank: its loss scale, or the steps it skipped'}, at step "
                                   f"{position.step}; stopping: nothing trains. The newest checkpoint, {latest}, "
                                   f"predates it: lower optimizer.lr, add warm-up or gradient clipping, or check "
                                   f"the loss scale it holds, and --resume")
            if on_step is not None:
                on_step(StepReport(position.step, position.samples, last_loss, lr, self.layout.world_size,
                                   torch.cat(trained, dim=1)))
                trained.clear()
            if progress is not None:
                progress.update(last_loss, position.step, epoch_before, lr,
                                loss_scale(self.engine) if self.engine.fp16_enabled() else None,
                                self.head_optimizer.steps_skipped)
            last = position.step >= plan.last_step
            evaluator(position.step, last=last)
            if last:
                break
            self.checkpoints.maybe_save(epoch_ended=self.epoch != epoch_before)
        if position.samples == plan.end and plan.dropped:
            log.info(f"{plan.dropped} samples of the last epoch were not trained: fewer than one global batch "
                     f"({G}) was left")
        self.checkpoints.save()
        if progress is not None:
            progress.close()
        return last_loss
