"""Where the Partial FC head's state lives, side by side: peak anonymous memory and step time per rank for
``device``, ``host`` and ``disk`` storage at several identity counts and the same rows used per step; and,
with ``--loss-curve``, the loss of real training with the state stored as float32, bfloat16 or float16.

    python -m ds_face.bench head-storage [--classes 1000000,4000000] [--rows 8192] [--storages device,host,disk]
    python -m ds_face.bench head-storage --loss-curve [--dtypes float32,bfloat16,float16] [--train-steps 150]

Storage table: every (identities, storage) cell runs on its own fresh ranks (``run_ranks``, gloo), so a
cell's peak is not an earlier cell's. A step is the head alone: ``set_position``, ``prepare``, forward of
random embeddings (``--batch`` per rank) through PartialFC, ``backward``, ``HeadOptimizer.step`` (SGD,
momentum 0.9). The sample rate is ``--rows`` x ranks / identities, so each rank uses about ``--rows`` rows a
step at every identity count. Memory is RssAnon from /proc/self/status: anonymous pages only, not the page
cache that holds ``disk``'s memory-mapped tables; its peak is sampled every 2 ms by a thread and after every
step, from just before the head is built (so a temporary shorter than 2 ms may be missed), in a pass of its
own where glibc unmaps freed blocks of 64 KiB or more at once (MALLOC_MMAP_THRESHOLD_), so that it follows
the live tensors rather than what the heap keeps. Step time, from a second pass with glibc's defaults: the
median over the timed steps of the slowest rank's time. ``--sync`` writes the page cache back after the build,
so that ``disk``'s timed steps exclude the writeback of its initial fill. The defaults (D 128, SGD: two
tables) hold 4 GiB of tables for both ranks at 4M identities, within a 24 GiB machine.

CPU ranks only: ``device`` and ``host`` are then both host RAM; the accelerator case is ``make gpu-check``.

Loss curve: the real Trainer (r_tiny backbone, DeepSpeed fp32, synthetic class-dependent data) from the same
seed once per storage dtype, on fresh ranks each; the per-step loss and its difference to float32.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

from ds_face.bench import DefaultsHelpFormatter, proc_status_kb
from ds_face.runtime.cpus import threads_per_rank
from ds_face.runtime.markdown import markdown_table

MiB_KB = 1024  # /proc/self/status counts in kB
STORAGES = ("device", "host", "disk")
DTYPES = ("float32", "bfloat16", "float16")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v.replace("_", "")) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def choice_list(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: each of {', '.join(allowed)}")
        return values
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ds_face.bench head-storage", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--classes", type=int_list, default="1000000,4000000", help="identity counts, comma-separated")
    p.add_argument("--storages", type=choice_list(STORAGES), default=",".join(STORAGES), help="comma-separated")
    p.add_argument("--storage-dtype", choices=DTYPES, default="float32", help="dtype of the stored tables")
    p.add_argument("--storage-dir", help="where disk storage's scratch files go (a temporary directory is made "
                                         "in it; default: the system's temporary directory)")
    p.add_argument("--sync", action="store_true", help="sync (write back the page cache) after the build, so "
                   "that disk's timed steps exclude the writeback of the initial fill")
    p.add_argument("--rows", type=int, default=8192, help="rows (class centres) each rank uses per step")
    p.add_argument("--embedding", type=int, default=128, help="embedding size D")
    p.add_argument("--batch", type=int, default=128, help="embeddings per rank per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per cell")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--world-size", type=int, default=2, help="local ranks (gloo)")
    p.add_argument("--seed", type=int, default=2048)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    curve = p.add_argument_group("loss curve (--loss-curve): storage dtype vs float32 in real training")
    curve.add_argument("--loss-curve", action="store_true", help="run the dtype comparison instead of the table")
    curve.add_argument("--dtypes", type=choice_list(DTYPES), default=",".join(DTYPES), help="the first is the reference")
    curve.add_argument("--train-steps", type=int, default=150, help="optimizer steps per dtype")
    curve.add_argument("--train-classes", type=int, default=500, help="identities of the synthetic data")
    curve.add_argument("--train-sample-rate", type=float, default=0.2)
    curve.add_argument("--train-storage", choices=STORAGES, default="device")
    curve.add_argument("--micro-batch", type=int, default=16, help="per rank")
    args = p.parse_args(argv)
    for name in ("rows", "embedding", "batch", "steps", "world_size", "train_steps", "train_classes", "micro_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if not 0.0 < args.train_sample_rate <= 1.0:
        p.error("--train-sample-rate must be in (0, 1]")
    too_few = [c for c in args.classes if args.rows * args.world_size > c]
    if too_few:
        p.error(f"--rows {args.rows} x {args.world_size} ranks is more than the {too_few[0]} identities")
    return args


# -- memory ----------------------------------------------------------------------------------------
class AnonPeak:
    """The peak RssAnon (kB) of this process: sampled by a thread every ``interval`` seconds and at each
    ``sample()`` (torch's kernels release the GIL, so the thread samples during them too)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, 0
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        now = proc_status_kb("RssAnon")
        with self._lock:
            self.peak = max(self.peak, now)
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> AnonPeak:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# -- one cell, on each rank ---------------------------------------------------------------------------
def measure_rank(rank: int, world_size: int, classes: int, storage: str, opts: dict) -> dict:
    """Build the head on this fresh rank, run warm-up + timed steps; this rank's figures."""
    import torch

    from ds_face.head import HeadOptimizer, Margin, PartialFC
    D, B = opts["embedding"], opts["batch"]
    rate = min(1.0, opts["rows"] * world_size / classes)  # one global rate: every rank uses about --rows rows
    start_kb = proc_status_kb("RssAnon")
    with AnonPeak() as anon:
        head = PartialFC(D, classes, rate, Margin.arcface(), seed=opts["seed"], storage=storage,
                         storage_dtype=opts["storage_dtype"], storage_dir=opts["storage_dir"])
        optimizer = HeadOptimizer(head, "sgd", momentum=0.9, weight_decay=5e-4)
        built_kb = anon.sample()
        if opts["sync"]:  # the initial fill's dirty pages written back now, not during the timed steps
            torch.distributed.barrier()
            os.sync()
            torch.distributed.barrier()
        gen = torch.Generator().manual_seed(opts["seed"] * 1000 + rank)
        times, rows = [], []
        for step in range(opts["warmup"] + opts["steps"]):
            embeddings = torch.randn(B, D, generator=gen).requires_grad_(True)
            labels = torch.randint(0, classes, (B,), generator=gen)
            torch.distributed.barrier()  # start together: a late rank would make the others wait in a collective
            began = time.perf_counter()
            head.set_position(step * B * world_size)
            head.prepare(labels)
            loss = head(embeddings, labels)
            used = head.pending_rows()[-1].index
            loss.backward()
            optimizer.step(lr=0.1)
            elapsed = time.perf_counter() - began
            anon.sample()
            if step >= opts["warmup"]:
                times.append(elapsed)
                rows.append(head.num_local if used is None else used.numel())
    return {"start_kb": start_kb, "built_kb": built_kb, "peak_kb": anon.peak, "times": times,
            "rows": statistics.mean(rows), "store_bytes": head.store.nbytes(), "sample_rate": rate,
            "loss": float(loss.detach())}


def measure_cell(classes: int, storage: str, opts: dict, world_size: int) -> dict:
    """Two passes on fresh ranks each: memory with glibc returning every freed block of 64 KiB or more at once
    (otherwise RssAnon wanders by +-50 MiB with what the heap happens to keep, whatever the identities), time
    with glibc's defaults, as a run has them (mmap per big temporary would slow the steps)."""
    from ds_face.runtime.spawn import run_ranks
    run = lambda env: run_ranks(world_size, measure_rank, classes, storage, opts,  # noqa: E731
                                threads=threads_per_rank(world_size), timeout=1800.0, env=env)
    memory, timing = run({"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}), run(None)
    step_max = [max(r["times"][i] for r in timing) for i in range(len(timing[0]["times"]))]
    return {"classes": classes, "storage": storage, "sample_rate": timing[0]["sample_rate"],
            "store_mib": max(r["store_bytes"] for r in timing) / 2**20,
            "rows": max(r["rows"] for r in timing),
            "peak_mib": max(r["peak_kb"] for r in memory) / MiB_KB,
            "above_start_mib": max(r["peak_kb"] - r["start_kb"] for r in memory) / MiB_KB,
            "built_mib": max(r["built_kb"] for r in memory) / MiB_KB,
            "peak_mib_default_malloc": max(r["peak_kb"] for r in timing) / MiB_KB,
            "step_ms": 1000 * statistics.median(step_max), "step_ms_steps": [1000 * t for t in step_max],
            "loss": timing[0]["loss"]}


def storage_report(cells: list[dict], args) -> str:
    device_ms = {c["classes"]: c["step_ms"] for c in cells if c["storage"] == "device"}
    rows = []
    for c in cells:
        base = device_ms.get(c["classes"])
        rows.append([f"{c['classes']:,}", c["storage"], f"{c['store_mib']:,.0f}", f"{c['rows']:,.0f}",
                     f"{c['peak_mib']:,.0f}", f"{c['above_start_mib']:,.0f}", f"{c['step_ms']:.1f}",
                     f"{c['step_ms'] / base:.2f}" if base else "-"])
    table = markdown_table(["identities", "storage", "stored MiB/rank", "rows/step/rank", "peak RssAnon MiB/rank",
                            "peak above start MiB/rank", "step ms (median)", "time / device"], rows, "llrrrrrr")
    setup = (f"{args.world_size} CPU ranks (gloo), {threads_per_rank(args.world_size)} thread(s) each; embedding "
             f"{args.embedding}, {args.batch} embeddings/rank/step, about {args.rows} rows/rank/step, SGD momentum "
             f"0.9, {args.storage_dtype} storage; {args.warmup} warm-up + {args.steps} timed steps per cell, each "
             f"cell on fresh ranks" + ("; sync after the build" if args.sync else ""))
    out = [setup, "", table]
    disk = sorted((c for c in cells if c["storage"] == "disk"), key=lambda c: c["classes"])
    if len(disk) >= 2:
        lo, hi = disk[0], disk[-1]
        out.append(f"\ndisk, {hi['classes']:,} / {lo['classes']:,} identities: peak RssAnon x"
                   f"{hi['peak_mib'] / lo['peak_mib']:.3f} (above start: {hi['above_start_mib']:,.0f} / "
                   f"{lo['above_start_mib']:,.0f} MiB); stored tables x{hi['store_mib'] / lo['store_mib']:.2f}")
    return "\n".join(out)


def run_storage(args) -> dict:
    if args.storage_dir:
        os.makedirs(args.storage_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ds_face-head-storage-", dir=args.storage_dir) as scratch:
        opts = {k: getattr(args, k) for k in ("embedding", "batch", "rows", "steps", "warmup", "seed", "storage_dtype",
                                        "sync")}
        opts["storage_dir"] = scratch
        cells = []
        for classes in args.classes:
            for storage in args.storages:
                print(f"measuring {classes:,} identities, {storage} ...", file=sys.stderr, flush=True)
                cells.append(measure_cell(classes, storage, opts, args.world_size))
    print(storage_report(cells, args), flush=True)
    return {"setting": {**opts, "storage_dir": args.storage_dir or tempfile.gettempdir(),
                        "world_size": args.world_size, "threads_per_rank": threads_per_rank(args.world_size)},
            "cells": cells}


# -- loss curve: storage dtype in real training ------------------------------------------------------
def train_rank(rank: int, world_size: int, dtype: str, opts: dict) -> list[float]:
    """The Trainer's mean loss after each optimizer step, with the head's state stored as ``dtype``."""
    import logging

    import deepspeed

    from ds_face.config import (DataConfig, HeadConfig, ModelConfig, OptimizerConfig, OutputConfig, RunConfig,
                                ScheduleConfig)
    from ds_face.data.order import BatchLayout
    from ds_face.training.trainer import Trainer
    deepspeed.utils.logger.setLevel(logging.WARNING)
    micro, steps = opts["micro_batch"], opts["train_steps"]
    ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    cfg = RunConfig(model=ModelConfig(backbone="r_tiny", embedding_size=32),
                    head=HeadConfig(num_classes=opts["train_classes"], sample_rate=opts["train_sample_rate"],
                                    storage=opts["train_storage"], storage_dtype=dtype),
                    optimizer=OptimizerConfig(name="sgd", lr=0.1),
                    schedule=ScheduleConfig(epochs=1),  # one epoch of exactly `steps` steps: LR decays to 0
                    data=DataConfig(num_samples=steps * micro * world_size),
                    output=OutputConfig(dir=opts["out"], tensorboard=False, log_every=10**9), seed=opts["seed"])
    losses: list[float] = []
    Trainer(cfg, ds, BatchLayout(micro, 1, world_size)).fit(on_step=lambda report: losses.append(report.loss))
    return losses


def curve_report(curves: dict[str, list[float]], args) -> str:
    ref_name, ref = next(iter(curves.items()))
    per_step = markdown_table(["step", *curves], [[i + 1, *(f"{c[i]:.4f}" for c in curves.values())]
                                                  for i in range(len(ref))], "r" * (len(curves) + 1))
    rows = []
    for name, losses in curves.items():
        diff = [abs(a - b) for a, b in zip(losses, ref)]
        rel = [d / abs(b) for d, b in zip(diff, ref)]
        rows.append([name, f"{losses[0]:.4f}", f"{losses[-1]:.4f}", f"{statistics.mean(losses[-10:]):.4f}",
                     f"{max(diff):.4f}", f"{statistics.mean(diff):.4f}", f"{max(rel):.2%}", f"{statistics.mean(rel):.2%}"])
    summary = markdown_table(["storage dtype", "first loss", "final loss", "mean of last 10",
                              f"max abs diff to {ref_name}", "mean abs diff", "max rel diff", "mean rel diff"],
                             rows, "lrrrrrrr")
    setup = (f"Trainer: r_tiny (embedding 32), DeepSpeed fp32 ZeRO 0, {args.world_size} CPU ranks x micro-batch "
             f"{args.micro_batch}, synthetic data with {args.train_classes} identities, sample rate "
             f"{args.train_sample_rate}, {args.train_storage} storage, SGD lr 0.1 momentum 0.9 wd 5e-4 decaying to 0 "
             f"over {args.train_steps} steps, seed {args.seed}; each dtype on fresh ranks. Per-step loss:")
    return f"{setup}\n\n{per_step}\n\n{summary}"


def run_loss_curve(args) -> dict:
    from ds_face.runtime.spawn import run_ranks
    opts = {k: getattr(args, k) for k in ("micro_batch", "train_steps", "train_classes", "train_sample_rate",
                                          "train_storage", "seed")}
    curves = {}
    for dtype in args.dtypes:
        print(f"training with {dtype} head storage ...", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="ds_face-loss-curve-") as out:  # one run directory for all ranks
            curves[dtype] = run_ranks(args.world_size, train_rank, dtype, {**opts, "out": out},
                                      threads=threads_per_rank(args.world_size), timeout=1800.0)[0]
    print(curve_report(curves, args), flush=True)
    return {"setting": opts, "curves": curves}


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run_loss_curve(args) if args.loss_curve else run_storage(args)
    if args.json:
        from ds_face.fileio import write_json_atomic
        write_json_atomic(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
