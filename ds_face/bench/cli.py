"""The options of the ``memory`` and ``speed`` commands: a grid of class counts x cells, checked; and
measuring that grid on fresh local ranks (``ds_face.bench.cells``) against the estimator's figures."""
from __future__ import annotations

import argparse
import re
import sys

from ds_face.bench import DefaultsHelpFormatter
from ds_face.bench.estimator import (MiB, OPTIMIZERS, PRECISIONS, STORAGE_WIDTHS, STORAGES,
                                     activation_elements_per_sample, dp_cell, parse_cell, pfc_cell, table)

_UNITS = {"": MiB, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": MiB, "mb": MiB, "mib": MiB,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'32GB', '32G', '24GiB', '32000MB', '32510' (MB) -> bytes; binary units (GB == GiB)."""
    m = re.fullmatch(r"\s*([+-]?[0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse memory size {text!r} (e.g. 32GB, 24GiB, 32000MB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value)


def parse_classes(text: str) -> list[int]:
    parts = [p.strip() for p in str(text).split(",")]
    if not text.strip() or any(not p.isdigit() or int(p) <= 0 for p in parts):
        raise ValueError(f"classes must be a comma-separated list of positive integers, got {text!r}")
    return [int(p) for p in parts]


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(p) for p in str(text).split(",")]
    except ValueError:
        raise ValueError(f"sample rates must be a comma-separated list of numbers, got {text!r}") from None
    bad = [r for r in rates if not 0.0 < r <= 1.0]
    if bad:
        raise ValueError(f"sample rates must be in (0, 1], got {bad[0]:g}")
    return rates


SEED_BENCHMARK = ("the Partial FC benchmark published with InsightFace, table 2 'GPU memory cost of different "
                  "parallel methods' (8x Tesla V100 32GB, r50, fp16, batch 128 per GPU)")


def build_parser(prog: str, description: str, measure_flag: bool = True) -> argparse.ArgumentParser:
    """The options of ``memory`` and ``speed`` (which always measures: no ``--measure``); --help shows defaults."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--backbone", default="r50", help="backbone name (r_tiny, r18, r34, r50, r100, r200)")
    p.add_argument("--embedding", type=int, default=512, help="embedding size")
    p.add_argument("--classes", default="125000,1400000,5500000,29000000", help="comma-separated class counts")
    p.add_argument("--world-size", type=int, default=8, help="ranks (devices); measured cells start this many locally")
    p.add_argument("--micro-batch", type=int, default=128, help="samples per rank per micro-step")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp16", help="the engine's precision")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="sgd", help="for the engine and the head")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0,
                   help="ZeRO stage of the backbone in the Model parallel / Partial FC cells")
    p.add_argument("--storage", choices=STORAGES, default="device",
                   help="where the head's tables live (head.storage): host and disk leave only the rows a step uses "
                        "on the device; not with the DP cells")
    p.add_argument("--storage-dtype", choices=list(STORAGE_WIDTHS), default="float32",
                   help="the head's stored dtype (head.storage_dtype); computed on in float32")
    p.add_argument("--sample-rates", default="0.1", help="Partial FC rates (< 1); 'Model parallel' is always shown")
    p.add_argument("--cells", help="only these cells, comma-separated (e.g. 'DP ZeRO-0,Model parallel,Partial FC 0.1'); "
                                   "default: DP ZeRO-0..3, Model parallel and a Partial FC cell per --sample-rates")
    p.add_argument("--device-memory", help="per-device budget (32GB, 24GiB, 32000MB; binary units): '-' above it; "
                                           "default: no budget")
    p.add_argument("--overhead-mb", type=float, default=400.0, help="fixed per-device overhead (CUDA context)")
    p.add_argument("--activation-mb-per-sample", type=float,
                   help="override the activation estimate (default: a leaf-module count; measured once with --measure)")
    p.add_argument("--breakdown", action="store_true", help="also print each cell's components (MiB)")
    p.add_argument("--compare-seed", action="store_true", help=f"also print the estimator beside {SEED_BENCHMARK}")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON (bytes)")
    p.add_argument("--plot", metavar="PATH.png", help="also draw MiB per device against classes, a line per cell, "
                                                      "the budget dashed (measured figures as dots)")
    if measure_flag:
        p.add_argument("--measure", action="store_true",
                       help="also run a few real training steps per cell on --world-size fresh local ranks "
                            "(synthetic data) and print measured next to estimated")
    p.add_argument("--steps", type=int, default=3, help="measured: timed steps per cell")
    p.add_argument("--warmup", type=int, default=1, help="measured: untimed steps first")
    p.add_argument("--timeout", type=float, default=1800.0, help="measured: seconds a cell may take")
    return p


def parse_grid(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[int], list[str], int | None, dict]:
    """Check the options; returns class counts, cells, device budget (bytes or None), estimate() keywords."""
    from ds_face.backbones import BACKBONES
    if args.backbone not in BACKBONES:
        p.error(f"unknown backbone {args.backbone!r}; valid names: {', '.join(BACKBONES)}")
    for label, value in (("--world-size", args.world_size), ("--micro-batch", args.micro_batch),
                         ("--embedding", args.embedding), ("--steps", args.steps)):
        if value <= 0:
            p.error(f"{label} must be a positive integer, got {value}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.overhead_mb < 0:
        p.error(f"--overhead-mb must be >= 0, got {args.overhead_mb:g}")
    if args.activation_mb_per_sample is not None and args.activation_mb_per_sample < 0:
        p.error(f"--activation-mb-per-sample must be >= 0, got {args.activation_mb_per_sample:g}")
    try:
        classes = parse_classes(args.classes)
        rates = parse_rates(args.sample_rates)
        device = parse_memory(args.device_memory) if args.device_memory is not None else None
        head_storage = (args.storage, args.storage_dtype) != ("device", "float32")
        if args.cells:
            cells = [c.strip() for c in args.cells.split(",")]
            for cell in cells:
                if parse_cell(cell)[0] == "dp" and head_storage:
                    raise ValueError(f"--cells {cell!r}: --storage / --storage-dtype apply to the head outside ZeRO "
                                     "only (Model parallel, Partial FC); the FC inside ZeRO is an engine parameter")
        else:
            cells = [] if head_storage else [dp_cell(s) for s in range(4)]  # DP cells have no head storage
            cells.append("Model parallel")
            cells += [pfc_cell(r) for r in rates if r < 1.0 and pfc_cell(r) not in cells]
    except ValueError as e:
        p.error(str(e))
    too_few = [c for c in classes if c < args.world_size]
    if too_few:
        p.error(f"--classes: {too_few[0]} classes cannot be split over {args.world_size} ranks")
    if getattr(args, "measure", True):  # speed always measures
        if head_storage:  # the measured cells build the run config's head with its defaults
            p.error("--storage / --storage-dtype: measured cells use device storage in float32 only; "
                    "the other storages are estimated (drop --measure)")
        from ds_face.bench.cells import device_facts, unsupported
        reason = unsupported(args.precision)  # asked in a child process on a GPU machine: no CUDA context here
        if reason:
            p.error(f"cannot measure --precision {args.precision} here: {reason}")
        facts = device_facts()
        if facts["device"] != "cpu" and args.world_size > facts["count"]:
            p.error(f"--world-size {args.world_size}: this machine has {facts['count']} "
                    f"{facts['device']} device(s); measured cells run one rank per device")
    act = None if args.activation_mb_per_sample is None else args.activation_mb_per_sample * MiB
    kw = dict(backbone=args.backbone, embedding=args.embedding, world_size=args.world_size,
              micro_batch=args.micro_batch, precision=args.precision, optimizer=args.optimizer,
              zero_stage=args.zero_stage, overhead_bytes=args.overhead_mb * MiB, activation_bytes_per_sample=act,
              storage=args.storage, storage_dtype=args.storage_dtype)
    return classes, cells, device, kw


def measured_setting(args):
    from ds_face.bench.cells import Setting
    return Setting(backbone=args.backbone, embedding=args.embedding, world_size=args.world_size,
                   micro_batch=args.micro_batch, precision=args.precision, optimizer=args.optimizer,
                   zero_stage=args.zero_stage, steps=args.steps, warmup=args.warmup)


def run_measured(classes: list[int], cells: list[str], kw: dict, args, for_memory: bool = True) -> tuple[dict, dict, dict]:
    """Measure every cell; returns (measured, estimates those are compared with, calibration).

    The estimates here have no fixed overhead (measured figures are above a baseline taken after start-up)
    and the backbone's activations measured once by a probe cell, unless --activation-mb-per-sample is given.
    """
    from ds_face.bench.cells import calibrate_activations, measure_grid  # torch and DeepSpeed: only to measure
    setting = measured_setting(args)
    calibration = {"leaf_module_bytes_per_sample": activation_elements_per_sample(args.backbone, args.embedding)
                   * PRECISIONS[args.precision]}
    act = kw["activation_bytes_per_sample"]
    if act is None and for_memory:
        print(f"measuring the activation figure once ({args.backbone}, micro-batch {args.micro_batch}, "
              f"{args.precision}) ...", file=sys.stderr, flush=True)
        act, probe = calibrate_activations(setting, args.timeout)
        calibration.update(measured_bytes_per_sample=act, probe=probe)
    compare_kw = {**kw, "overhead_bytes": 0, "activation_bytes_per_sample": act}
    _, estimates = table(classes, cells, None, **compare_kw)
    return measure_grid(classes, cells, setting, estimates, args.timeout, for_memory), estimates, calibration


def cell_notes(measured: dict) -> str:
    return "\n".join(f"- {c:,}, {cell}: {m.get('skipped') or m.get('error')}"
                      for c, per_cell in measured.items() for cell, m in per_cell.items()
                      if "skipped" in m or "error" in m)

