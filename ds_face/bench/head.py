"""Partial FC head alone: model parallel (sample_rate 1.0) vs Partial FC 0.1, time and memory per rank.

    deepspeed --num_gpus 2 --module ds_face.bench.head --classes 1000000 --embedding 512 --batch 64 --steps 5

One head step = PartialFC forward (all-gather, sampling, margin, distributed CE)
+ loss.backward() + HeadOptimizer.step, on random embeddings that require grad
and random labels in [0, C). No backbone, so unlike the seed's tables (seeds/003:
whole r50 steps on 8x V100) the ratios here are the head's alone. Rank 0 prints
a markdown table and the PFC / model-parallel ratios next to the seed's.

Memory is the peak resident set (VmHWM) above a baseline taken just before the
head is built, per rank. Each variant runs in a FRESH child process (its own
gloo group on a new port): glibc keeps freed small-to-medium blocks resident
and raises its mmap threshold after big frees, so a second variant in the same
process would reuse the first one's pages and under-report its peak.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import time

import torch

from ds_face.bench import common_args, proc_status_kb, reset_peak_rss, launched_threads_per_rank
from ds_face.runtime.markdown import markdown_table
from ds_face.bench.estimator import analytic_bytes
from ds_face.runtime.dist import exit_without_teardown, init, shutdown
from ds_face.fileio import write_json_atomic
from ds_face.runtime.spawn import free_port

# seeds/003, 8x V100, 1M identities, whole training step (r50 + head): Partial FC 0.1 / model parallel.
SEED_V100_1M = {"speed": 4803 / 3449, "time": 3449 / 4803, "memory": 5620 / 9966}
MiB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ds_face.bench.head", description=__doc__.splitlines()[0])
    return common_args(p, classes=1_000_000, batch=64, steps=5, warmup=2,
                       batch_help="embeddings per rank per step").parse_args(argv)


def run_variant(rate: float, port: int, args: argparse.Namespace) -> dict:
    """Build and time one head in this fresh process; returns this rank's figures."""
    from ds_face.head import HeadOptimizer, Margin, PartialFC

    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(launched_threads_per_rank())
    init(dist_backend="gloo", verbose=False)
    rank = torch.distributed.get_rank()
    try:
        baseline_kb = proc_status_kb("VmRSS")
        reset = reset_peak_rss()
        head = PartialFC(args.embedding, args.classes, rate, Margin.arcface(), seed=args.seed)
        optimizer = HeadOptimizer(head, "sgd", momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(args.seed * 100 + rank)
        times = []
        for step in range(args.warmup + args.steps):
            embeddings = torch.randn(args.batch, args.embedding, generator=gen).requires_grad_(True)
            labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
            torch.distributed.barrier()  # start together: the collectives would make early ranks wait
            start = time.perf_counter()
            head(embeddings, labels).backward()
            optimizer.step(lr=0.1)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        return {"rate": rate, "rank": rank, "world_size": head.world_size, "times": times,
                "baseline_mib": baseline_kb / 1024, "peak_mib": (proc_status_kb("VmHWM") - baseline_kb) / 1024,
                "peak_reset": reset, "analytic": analytic_bytes(head, args.batch)}
    finally:
        torch.distributed.destroy_process_group()


def summarize(per_rank: list[dict], batch: int) -> dict:
    means = [statistics.mean(r["times"]) * 1000 for r in per_rank]
    world = per_rank[0]["world_size"]
    return {"sample_rate": per_rank[0]["rate"], "ms_rank0": means[0], "ms_max": max(means),
            "samples_per_s": world * batch / (max(means) / 1000),
            "ms_steps_rank0": [t * 1000 for t in per_rank[0]["times"]],
            "peak_mib_per_rank": max(r["peak_mib"] for r in per_rank),
            "peak_mib_by_rank": [r["peak_mib"] for r in per_rank],
            "analytic_mib_per_rank": max(sum(r["analytic"].values()) for r in per_rank) / MiB,
            "analytic_bytes_rank0": per_rank[0]["analytic"], "peak_reset": all(r["peak_reset"] for r in per_rank)}


def report(results: dict, args) -> str:
    mp_, pfc = results["model_parallel"], results["partial_fc"]
    rows = [[name, r["sample_rate"], f"{r['ms_rank0']:.1f}", f"{r['ms_max']:.1f}", f"{r['samples_per_s']:.0f}",
             f"{r['peak_mib_per_rank']:.0f}", f"{r['analytic_mib_per_rank']:.0f}"]
            for name, r in (("model parallel", mp_), (f"Partial FC {pfc['sample_rate']:g}", pfc))]
    table = markdown_table(["variant", "sample rate", "ms/step rank 0", "ms/step max rank", "samples/s",
                            "peak MiB/rank", "analytic MiB/rank"], rows)
    ratio = lambda key: pfc[key] / mp_[key]  # noqa: E731
    ratios = markdown_table(
        ["PFC / model parallel", "this run (head only)", "seed 003: 8x V100, 1M ids, whole r50 step"],
        [["speed (samples/s)", f"{ratio('samples_per_s'):.2f}", f"{SEED_V100_1M['speed']:.2f}"],
         ["time (ms/step)", f"{ratio('ms_max'):.2f}", f"{SEED_V100_1M['time']:.2f}"],
         ["peak memory per rank", f"{ratio('peak_mib_per_rank'):.2f}", f"{SEED_V100_1M['memory']:.2f}"],
         ["analytic memory per rank", f"{ratio('analytic_mib_per_rank'):.2f}", "-"]])
    results["ratios"] = {"speed": ratio("samples_per_s"), "time": ratio("ms_max"),
                         "peak_memory": ratio("peak_mib_per_rank"), "analytic_memory": ratio("analytic_mib_per_rank"),
                         "seed_v100_1m": SEED_V100_1M}
    setup = (f"{args.classes} classes, embedding {args.embedding}, batch {args.batch}/rank x "
             f"{results['world_size']} ranks, {args.steps} timed steps after "
             f"{args.warmup} warm-up, {launched_threads_per_rank()} thread(s)/rank")
    note = "" if mp_["peak_reset"] and pfc["peak_reset"] else \
        "\n(VmHWM could not be reset: peaks include import-time peaks)"
    return f"{setup}\n\n{table}\n\n{ratios}{note}"


def main(argv=None) -> int:
    args = parse_args(argv)
    init(dist_backend="gloo")  # only to agree on ports and gather results
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    spawn = multiprocessing.get_context("spawn")
    results = {"world_size": world}
    for name, rate in (("model_parallel", 1.0), ("partial_fc", args.sample_rate)):
        port = [free_port() if rank == 0 else 0]
        torch.distributed.broadcast_object_list(port, src=0)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            mine = pool.submit(run_variant, rate, port[0], args).result()
        per_rank = [None] * world
        torch.distributed.all_gather_object(per_rank, mine)
        results[name] = summarize(per_rank, args.batch)
    if rank == 0:
        print(report(results, args), flush=True)
        if args.json:
            write_json_atomic(args.json, results)
    shutdown()
    return 0


if __name__ == "__main__":
    exit_without_teardown(main())  # as ds_face.train: no interpreter teardown racing gloo's threads
