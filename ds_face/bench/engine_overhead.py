"""A full training step under the DeepSpeed engine (ZeRO 0 and 2, fp32) vs a plain PyTorch DDP loop.

    deepspeed --num_gpus 2 --module ds_face.bench.engine_overhead --backbone r_tiny --classes 20000 --batch 32 --steps 20

Every variant gets the same backbone init (same seed), the same Partial FC head
+ HeadOptimizer, the same SGD settings, LR schedule and gradient clipping, and
the very same pre-generated synthetic batches. The DeepSpeed variants are the
project's own ``Trainer`` wiring stepped by ``ds_face.training.trainer.micro_step``; DDP
averages gradients over ranks exactly as DeepSpeed does, so the head code is
unchanged (loss scale 1). Rank 0 prints ms/step and the ratio engine / DDP, plus
each variant's last loss as a check that all three trained the same thing: with
--clip 0 they are bit-identical; with clipping they drift apart from rounding
(DeepSpeed sums the gradient norm in another order), amplified over the steps.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from ds_face.bench import common_args, configs, launched_threads_per_rank
from ds_face.runtime.markdown import markdown_table
from ds_face.runtime.dist import exit_without_teardown, init, shutdown
from ds_face.fileio import write_json_atomic


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds_face.bench.engine_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="r_tiny", help="backbone name (r_tiny, r18, r34, r50, r100, r200)")
    p.add_argument("--clip", type=float, default=5.0, help="gradient clipping, as in ds_configs/*.json (0: off)")
    return common_args(p, classes=20000, batch=32, steps=20, warmup=3, batch_help="micro-batch per rank").parse_args(argv)


def run_config(args, total_steps: int, world: int):
    """One epoch of exactly ``total_steps`` optimizer steps; optimizer, margin: the run-config defaults."""
    return configs.run_config(args.backbone, args.embedding, args.classes, args.sample_rate,
                              total_steps * args.batch * world, args.seed)


def deepspeed_variant(cfg, layout, stage: int, args):
    """The project's Trainer (engine + head + head optimizer), stepped by micro_step."""
    from ds_face.training.schedule import SampleSchedule
    from ds_face.training.trainer import Trainer, micro_step
    # stage 2 as ds_configs/zero2_fp32.json
    trainer = Trainer(cfg, configs.ds_config(args.batch, stage, clipping=args.clip, overlap_comm=stage == 2), layout)
    schedule = SampleSchedule(cfg.optimizer.lr, trainer.plan().total, 0, cfg.schedule.power)
    done = [0]  # samples seen: the same curve as the DDP variant's step-counting LambdaLR

    def step(batch):
        done[0] += layout.global_batch
        lr = schedule.apply(trainer.engine.optimizer, done[0])
        return micro_step(trainer.engine, trainer.head, trainer.head_optimizer, batch, lr).loss
    return step


def ddp_variant(cfg, total_steps: int, clip: float, device: str):
    """Trainer's wiring with DDP in place of the engine: same init, optimizer, schedule, head, on the device the
    engine uses (the accelerator's: this rank's GPU, or the CPU)."""
    from torch.nn.parallel import DistributedDataParallel

    from ds_face.backbones import get_backbone
    from ds_face.data.arrow import normalize
    from ds_face.head import build_head
    from ds_face.training.schedule import poly_warmup_scheduler
    from ds_face.training.trainer import build_backbone_optimizer, seed_everything

    seed_everything(cfg.seed)
    backbone = get_backbone(cfg.model.backbone, cfg.model.embedding_size).to(device)
    index = torch.device(device).index
    # after init_distributed: uses its process group (gloo on CPU, NCCL on GPUs)
    model = DistributedDataParallel(backbone, device_ids=None if index is None else [index])
    optimizer = build_backbone_optimizer(cfg, backbone)
    scheduler = poly_warmup_scheduler(total_steps, 0, cfg.schedule.power)(optimizer)
    head, head_optimizer = build_head(cfg, device)

    def step(batch):
        images = batch["image"]
        if images.dtype == torch.uint8:  # as micro_step: the loader ships uint8 NHWC, normalised in the step
            images = normalize(images)
        loss = head(model(images), batch["label"])
        loss.backward()
        if clip:  # what the engine's "gradient_clipping" does
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        lr = optimizer.param_groups[0]["lr"]  # this step's LR, read before the schedule advances
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        head_optimizer.step(lr, 1.0)
        return loss.detach()

    return step


def main(argv=None) -> int:
    args = parse_args(argv)
    import deepspeed

    from ds_face.config import BatchLayout
    from ds_face.training.trainer import build_loader

    from deepspeed.accelerator import get_accelerator
    accelerator = get_accelerator()
    torch.set_num_threads(launched_threads_per_rank())
    if accelerator.device_name() != "cpu":  # one device per rank, chosen before any use (as ds_face.runtime.spawn)
        accelerator.set_device(args.local_rank)
    # the accelerator's backend (gloo on CPU, NCCL on GPUs), before deepspeed.initialize and DDP construction
    init(dist_backend=accelerator.communication_backend_name())
    device = accelerator.current_device_name()
    deepspeed.utils.logger.setLevel(logging.WARNING)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    total = args.warmup + args.steps
    cfg, layout = run_config(args, total, world), BatchLayout(args.batch, 1, world)
    # once, untimed, and on the device before the clock starts: no host-to-device copy is timed
    batches = [{k: v.to(device) for k, v in batch.items()}
               for batch in build_loader(cfg, layout, rank).micro_batches(0, total * layout.global_batch)]

    builders = {"DDP": lambda: ddp_variant(cfg, total, args.clip, device),
                "DeepSpeed ZeRO 0": lambda: deepspeed_variant(cfg, layout, 0, args),
                "DeepSpeed ZeRO 2": lambda: deepspeed_variant(cfg, layout, 2, args)}
    steps = {name: build() for name, build in builders.items()}  # all alive at once
    # One step of each variant in turn, so that drift in the machine's speed hits all variants alike
    # (back-to-back runs are far noisier on a shared machine: BENCHMARKS.md).
    times, losses = {name: [] for name in steps}, {}
    for i, batch in enumerate(batches):
        for name, step in steps.items():
            torch.distributed.barrier()  # start together, so one rank's lag isn't billed to the next step
            accelerator.synchronize()  # a GPU runs kernels asynchronously: time from an idle device ...
            start = time.perf_counter()
            loss = step(batch)
            accelerator.synchronize()  # ... to the step's last kernel
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
            losses[name] = float(loss)
    results = {}
    for name, mine in times.items():
        per_rank = [None] * world
        torch.distributed.all_gather_object(per_rank, [statistics.mean(mine) * 1000, statistics.median(mine) * 1000])
        mean, median = max(r[0] for r in per_rank), max(r[1] for r in per_rank)
        results[name] = {"ms_rank0": per_rank[0][0], "ms_max": mean, "ms_median_max": median,
                         "samples_per_s": world * args.batch / (mean / 1000), "last_loss": losses[name]}
    if rank == 0:
        ddp = results["DDP"]["ms_max"]
        ddp_median = results["DDP"]["ms_median_max"]
        rows = [[name, f"{r['ms_rank0']:.1f}", f"{r['ms_max']:.1f}", f"{r['ms_median_max']:.1f}",
                 f"{r['samples_per_s']:.0f}", f"{r['ms_max'] / ddp:.3f}", f"{r['ms_median_max'] / ddp_median:.3f}",
                 f"{r['last_loss']:.5f}"] for name, r in results.items()]
        print(f"{args.backbone}, embedding {args.embedding}, {args.classes} classes (sample rate {args.sample_rate}), "
              f"batch {args.batch}/rank x {world} ranks, fp32, {args.steps} timed steps after {args.warmup} "
              f"warm-up, {launched_threads_per_rank()} thread(s)/rank\n")
        print(markdown_table(["variant", "mean ms/step rank 0", "mean ms/step max rank", "median ms/step max rank",
                              "samples/s", "mean / DDP", "median / DDP", f"loss at step {total}"], rows), flush=True)
        if args.json:
            write_json_atomic(args.json, results)
    shutdown()
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())  # as ds_face.train: no interpreter teardown racing gloo's threads
