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
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ds_face.config import BatchLayout, ConfigError, RunConfig, check_together, load_ds_config, load_run_config
from ds_face.progress import Progress, log, setup_logging


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
                             "on any number of ranks")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


# -- the step ---------------------------------------------------------------------------------------

def model_dtype(engine) -> torch.dtype:
    if engine.fp16_enabled():
        return torch.float16
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def loss_scale(engine) -> float:
    """The loss scale the next backward uses (1.0 unless fp16 loss scaling is on)."""
    return float(getattr(engine.optimizer, "loss_scale", 1.0))


@dataclass
class MicroStep:
    loss: torch.Tensor  # detached
    boundary: bool  # an optimizer step was due after this micro-batch
    applied: bool  # ... and both backbone and head took it (False if skipped or not a boundary)


def micro_step(engine, head, head_optimizer, batch: dict) -> MicroStep:
    images = batch["image"].to(engine.device, dtype=model_dtype(engine), non_blocking=True)
    labels = batch["label"].to(engine.device, non_blocking=True)
    loss = head(engine(images), labels)
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    # Read before engine.step(), which may advance the schedule and change the loss scale.
    lr, scale = engine.get_lr()[0], loss_scale(engine)
    engine.step()
    applied = boundary and head_optimizer.step(lr, scale, engine_applied=engine.was_step_applied())
    return MicroStep(loss.detach(), boundary, applied)


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


def build_loader(cfg: RunConfig, layout: BatchLayout, rank: int):
    from ds_face.data import ArrowFaces, SyntheticFaces
    d = cfg.data
    if d.source == "arrow":
        return ArrowFaces(d.path, layout.micro_batch, layout.accumulation, rank, layout.world_size,
                          num_workers=d.num_workers, seed=cfg.seed, shuffle_buffer=d.shuffle_buffer,
                          flip=d.flip, on_corrupt=d.on_corrupt)
    return SyntheticFaces(cfg.head.num_classes, cfg.data.num_samples, layout.micro_batch, layout.accumulation,
                          rank, layout.world_size, seed=cfg.seed)


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config: dict, layout: BatchLayout, init_backbone: str | None = None):
        import deepspeed

        from ds_face.backbones import get_backbone
        from ds_face.head import HeadOptimizer, Margin, PartialFC
        from ds_face.schedule import poly_warmup_scheduler

        self.cfg, self.layout = cfg, layout
        self.rank = torch.distributed.get_rank()
        self.output_dir = Path(cfg.output.dir)
        seed_everything(cfg.seed)  # same backbone init everywhere; DeepSpeed broadcasts rank 0's anyway

        self.loader = build_loader(cfg, layout, self.rank)
        if self.loader.steps_per_epoch < 1:
            raise ConfigError(f"an epoch has no optimizer step: fewer samples than one global batch "
                              f"({layout.per_step})")
        self.total_steps = cfg.schedule.epochs * self.loader.steps_per_epoch
        warmup = int(cfg.schedule.warmup_epochs * self.loader.steps_per_epoch)

        backbone = get_backbone(cfg.model.backbone, cfg.model.embedding_size, cfg.model.dropout,
                                cfg.model.gradient_checkpointing)
        if init_backbone:  # before the engine, which broadcasts rank 0's weights
            from ds_face.init_backbone import load_backbone_file
            load_backbone_file(init_backbone, backbone, cfg.model.backbone)
            log.info(f"backbone initialised from {init_backbone}")
        self.engine, _, _, _ = deepspeed.initialize(
            model=backbone, optimizer=build_backbone_optimizer(cfg, backbone), config=ds_config,
            lr_scheduler=poly_warmup_scheduler(self.total_steps, warmup, cfg.schedule.power))

        margin = Margin(s=cfg.head.scale, m1=cfg.head.margin[0], m2=cfg.head.margin[1], m3=cfg.head.margin[2])
        self.head = PartialFC(cfg.model.embedding_size, cfg.head.num_classes, cfg.head.sample_rate, margin,
                              device=self.engine.device, seed=cfg.seed)
        opt = cfg.optimizer
        self.head_optimizer = HeadOptimizer(self.head, opt.name, momentum=opt.momentum,
                                            weight_decay=opt.weight_decay)
        self.global_step = 0
        self.epoch = 0
        self.losses: list[float] = []  # mean loss of each optimizer step this process ran
        self._saved_step = None  # the step of the newest checkpoint, so that no tag is written twice

    @property
    def checkpoint_dir(self) -> Path:
        from ds_face.checkpoint import SAVE_DIR
        return self.output_dir / SAVE_DIR

    def save_checkpoint(self) -> None:
        from ds_face import checkpoint
        if self._saved_step != self.global_step:
            tag = checkpoint.save(self, self.checkpoint_dir, self.cfg.checkpoint.keep_last)
            self._saved_step = self.global_step
            log.info(f"saved checkpoint {self.checkpoint_dir / tag}")

    def resume(self) -> None:
        from ds_face import checkpoint
        checkpoint.load(self, self.checkpoint_dir)
        self._saved_step = self.global_step

    def describe(self) -> None:
        e, l, h = self.engine, self.layout, self.head
        precision = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[model_dtype(e)]
        log.info(f"world size {l.world_size}, ZeRO stage {e.zero_optimization_stage()}, {precision}, "
                 f"micro-batch {l.micro_batch} x accumulation {l.accumulation} x {l.world_size} ranks = "
                 f"{l.per_step} samples per optimizer step")
        log.info(f"{self.loader.steps_per_epoch} steps per epoch, {self.cfg.schedule.epochs} epochs, "
                 f"{self.total_steps} steps in the schedule"
                 + (f", stopping after {self.cfg.schedule.max_steps}" if self.cfg.schedule.max_steps else ""))
        log.info(f"Partial FC: {h.num_classes} classes, {h.num_local} on rank 0 ({h.num_local * h.embedding_size * 4 / 2**20:.1f} MiB "
                 f"fp32 weights), sample_rate {h.sample_rate} -> {h.num_sample if h.sample_rate < 1 else h.num_local} "
                 f"centres per rank per step")

    def fit(self) -> float:
        """Train until the schedule (or ``max_steps``) ends; returns the last logged mean loss."""
        cfg = self.cfg
        last_step = min(self.total_steps, cfg.schedule.max_steps or self.total_steps)
        progress = None
        if self.rank == 0:
            tb_dir = self.output_dir / "tensorboard" if cfg.output.tensorboard else None
            progress = Progress(last_step, self.layout.per_step, cfg.output.log_every, tb_dir, self.global_step)
        from ds_face.eval import TrainingEvaluator
        evaluate = TrainingEvaluator(self, progress)  # eval.sets on rank 0, every eval.every_steps and at the end
        step_losses: list[torch.Tensor] = []
        last_loss = float("nan")
        every = cfg.checkpoint.every_steps
        while self.global_step < last_step:
            self.loader.set_epoch(self.epoch)
            for batch in self.loader:
                result = micro_step(self.engine, self.head, self.head_optimizer, batch)
                step_losses.append(result.loss)
                if not result.boundary:
                    continue
                self.global_step += 1
                last_loss = torch.stack(step_losses).mean().item()
                self.losses.append(last_loss)
                step_losses.clear()
                if progress is not None:
                    progress.update(last_loss, self.global_step, self.epoch, self.engine.get_lr()[0],
                                    loss_scale(self.engine) if self.engine.fp16_enabled() else None,
                                    self.head_optimizer.steps_skipped)
                evaluate(self.global_step, last=self.global_step >= last_step)
                if self.global_step >= last_step:
                    break
                if every and self.global_step % every == 0:
                    self.save_checkpoint()
            else:
                self.epoch += 1
                self.save_checkpoint()  # at each epoch's end (unless this step was just saved)
        self.save_checkpoint()
        if progress is not None:
            progress.close()
        return last_loss


def watch_sibling_ranks(rank: int):
    """Name the rank that died when this one is stopped because of it; returns ``dead() -> str``.

    A rank killed outright (OOM killer, kill -9) cannot say so itself. Its siblings on the node see it
    either as a failed collective (gloo: connection reset) or as the launcher's SIGTERM (deepspeed's
    launch.py and torchrun stop the others when one exits non-zero; launch.py's message names the last
    rank it spawned, not the dead one). Both paths print ``ds_face.train: rank R: rank K (pid P) died``.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) < 2 or "LOCAL_RANK" not in os.environ:
        return lambda: ""  # not started by a launcher
    import signal

    import psutil
    try:  # the launcher's other children, all spawned once init_distributed returned: {pid: RANK}
        siblings = {p.pid: p.environ().get("RANK", "?") for p in psutil.Process(os.getppid()).children()
                    if p.pid != os.getpid()}
    except (psutil.Error, OSError):
        siblings = {}

    def dead() -> str:
        def gone(pid):
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                return True
        return ", ".join(f"rank {r} (pid {pid}) died" for pid, r in sorted(siblings.items()) if gone(pid))

    def on_sigterm(signum, frame):
        why = dead() or "no other rank on this node died (a rank on another node, or a user's stop)"
        print(f"ds_face.train: rank {rank}: stopped by SIGTERM: {why}", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    signal.signal(signal.SIGTERM, on_sigterm)
    return dead


def main(argv=None) -> int:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    try:  # both files are checked before any process group starts
        cfg = load_run_config(args.config, parse_overrides(args.set))
        ds_config, layout = load_ds_config(args.deepspeed_config, world_size)
        check_together(cfg, layout, args.config)
        if args.init_backbone:  # keys and shapes against the config, on the meta device (no weights built)
            from ds_face.init_backbone import check_backbone_file
            check_backbone_file(args.init_backbone, cfg.model)
        from ds_face.checkpoint import LATEST, SAVE_DIR
        checkpoints = Path(cfg.output.dir) / SAVE_DIR
        if args.resume and args.init_backbone:
            raise ConfigError("--resume and --init-backbone together: the checkpoint's backbone would replace "
                              "the file's; use one")
        if args.resume and not (checkpoints / LATEST).is_file():
            raise ConfigError(f"--resume: no complete checkpoint in {checkpoints} ('latest' not found)")
        if not args.resume and (checkpoints / LATEST).is_file():
            raise ConfigError(f"{checkpoints} already holds checkpoints; pass --resume to continue that run, "
                              f"or set another output.dir (nothing was overwritten)")
    except ConfigError as err:
        print(f"ds_face.train: error: {err}", file=sys.stderr)
        return 2
    setup_logging(rank, Path(cfg.output.dir))

    from ds_face.dist import init
    init(timeout=datetime.timedelta(minutes=int(os.environ.get("DS_FACE_TIMEOUT_MIN", 30))))
    dead_siblings = watch_sibling_ranks(rank)
    trainer = Trainer(cfg, ds_config, layout, init_backbone=args.init_backbone)
    if args.resume:
        from ds_face.checkpoint import CheckpointError
        try:
            trainer.resume()
        except CheckpointError as err:  # raised on every rank alike
            print(f"ds_face.train: error: {err}", file=sys.stderr)
            return 2
    trainer.describe()
    try:
        trainer.fit()
    except RuntimeError as err:  # a failed collective: say which rank died, after the traceback
        dead = dead_siblings()
        if not dead and not any(s in str(err) for s in ("gloo", "NCCL", "Connection reset", "Connection closed")):
            raise
        import traceback
        traceback.print_exc()
        dead = dead or "a collective failed and no rank on this node died: one on another node probably did"
        print(f"ds_face.train: rank {rank}: error: {dead}; stopping", file=sys.stderr, flush=True)
        return 1
    log.info(f"done: {trainer.global_step} optimizer steps, {trainer.head_optimizer.steps_skipped} skipped")
    from ds_face.dist import shutdown
    shutdown()
    return 0


if __name__ == "__main__":
    from ds_face.dist import exit_without_teardown
    exit_without_teardown(main())
