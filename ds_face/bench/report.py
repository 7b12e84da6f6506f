"""A training-speed report for this machine, shaped like InsightFace's per-GPU reports (seeds 000-002).

    python -m ds_face.bench report --out reports/<name>.md [--backbone r50 --classes 2000000 \\
        --world-size 8 --batch-sizes 128,256 --precisions fp32,tf32,fp16,bf16 --sample-rate 0.1]

The report holds a test-server spec table read from this machine (CPU model and count, memory, GPU model
and count, OS, CUDA, cuDNN, Python, PyTorch, DeepSpeed versions), then samples/s for every batch size
(per rank) x precision x Partial FC off (model parallel, sample rate 1.0) / on (``--sample-rate``), each
measured with a few real training steps on ``--world-size`` fresh local ranks and synthetic data (the
cells of ``ds_face.bench.cells``), the Partial FC on/off ratio of each row pair, and a PNG plot beside
the markdown (samples/s against batch size, a line per precision and Partial FC setting). A precision this
machine cannot train in (DeepSpeed's checks: fp16 / bf16 support; TF32 needs an Ampere or newer GPU) is
listed as not measured, with the reason. The defaults are a small CPU run.

An existing --out is refused unless --overwrite; the files are written atomically.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

from ds_face.bench import DefaultsHelpFormatter
from ds_face.runtime.markdown import markdown_table

PRECISION_ORDER = ("fp32", "tf32", "fp16", "bf16")


# -- the machine ---------------------------------------------------------------------------------
def _cpu() -> str:
    models, sockets = [], set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    models.append(value.strip())
                elif key.strip() == "physical id":
                    sockets.add(value.strip())
    except OSError:
        pass
    model = models[0] if models else (platform.processor() or platform.machine())
    count = f"{len(sockets)} x " if len(sockets) > 1 else ""
    return f"{count}{model} ({os.cpu_count()} logical cores)"


def _os() -> str:
    try:
        with open("/etc/os-release") as f:
            fields = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
        return fields.get("PRETTY_NAME", "").strip('"') or platform.platform()
    except OSError:
        return platform.platform()


def machine_spec() -> list[tuple[str, str]]:
    """(key, value) rows of the test-server spec table, read from this machine."""
    import deepspeed
    import psutil
    import torch

    from ds_face.bench.cells import device_facts
    facts = device_facts()  # a GPU is asked in a child process: this one opens no CUDA context
    names = facts["names"]
    if names:
        memory = facts["memory_bytes"][0] / 2**30
        gpu = f"{len(names)} x {names[0]} ({memory:.0f} GiB)" + ("" if len(set(names)) == 1 else f" ({', '.join(names)})")
    elif facts["device"] != "cpu":
        gpu = f"{facts['count']} x {facts['device']}"
    else:
        gpu = "none (CPU ranks)"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return [("CPU", _cpu()), ("Memory", f"{psutil.virtual_memory().total / 2**30:.0f} GiB"), ("GPU", gpu),
            ("OS", _os()),
            ("Installation", f"CUDA {torch.version.cuda or '- (CPU build)'}, cuDNN {cudnn or '-'}"),
            ("Installation", f"Python {platform.python_version()}"),
            ("Installation", f"PyTorch {torch.__version__}"), ("Installation", f"DeepSpeed {deepspeed.__version__}")]


# -- the measurements ----------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ds_face.bench report", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="the markdown file to write (a .png plot goes beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--backbone", default="r_tiny", help="backbone name (r_tiny, r18, r34, r50, r100, r200)")
    p.add_argument("--embedding", type=int, default=512, help="embedding size")
    p.add_argument("--classes", type=int, default=100_000, help="identities in the synthetic data")
    p.add_argument("--world-size", type=int, default=2, help="local ranks (one per device on a GPU machine)")
    p.add_argument("--batch-sizes", default="16,32", help="micro-batch per rank, comma-separated")
    p.add_argument("--precisions", default="fp32,tf32,fp16,bf16", help=f"any of {', '.join(PRECISION_ORDER)}")
    p.add_argument("--sample-rate", type=float, default=0.1, help="Partial FC 'on'; 'off' is model parallel (1.0)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0, help="the backbone's ZeRO stage")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--no-plot", action="store_true", help="markdown only")
    args = p.parse_args(argv)
    from ds_face.backbones import BACKBONES
    if args.backbone not in BACKBONES:
        p.error(f"unknown backbone {args.backbone!r}; valid names: {', '.join(BACKBONES)}")
    for label, value in (("--world-size", args.world_size), ("--embedding", args.embedding),
                         ("--steps", args.steps), ("--classes", args.classes)):
        if value <= 0:
            p.error(f"{label} must be a positive integer, got {value}")
    if args.classes < args.world_size:
        p.error(f"--classes {args.classes} cannot be split over {args.world_size} ranks")
    if not 0.0 < args.sample_rate < 1.0:
        p.error(f"--sample-rate must be in (0, 1) (1.0 is the 'off' row), got {args.sample_rate:g}")
    parts = [b.strip() for b in args.batch_sizes.split(",")]
    if not all(b.isdigit() and int(b) > 0 for b in parts):
        p.error(f"--batch-sizes must be a comma-separated list of positive integers, got {args.batch_sizes!r}")
    args.batch_sizes = [int(b) for b in parts]
    args.precisions = [x.strip() for x in args.precisions.split(",")]
    bad = [x for x in args.precisions if x not in PRECISION_ORDER]
    if bad:
        p.error(f"unknown precision {bad[0]!r}; valid: {', '.join(PRECISION_ORDER)}")
    if Path(args.out).exists() and not args.overwrite:
        p.error(f"{args.out} exists; pass --overwrite to replace it (nothing was written)")
    return args


def measure(args) -> list[dict]:
    """One row per batch size x precision x Partial FC off/on: samples/s, or the reason it was not measured."""
    from tqdm import tqdm

    from ds_face.bench.cells import Setting, measure_cell, unsupported
    from ds_face.bench.estimator import pfc_cell
    rows = []
    todo = [(b, prec, rate) for prec in args.precisions for b in args.batch_sizes for rate in (1.0, args.sample_rate)]
    for batch, precision, rate in tqdm(todo, desc="report", unit="run", disable=None):
        row = {"batch": batch, "precision": precision, "sample_rate": rate}
        reason = unsupported(precision)
        if reason:
            rows.append({**row, "not_measured": reason})
            continue
        setting = Setting(backbone=args.backbone, embedding=args.embedding, world_size=args.world_size,
                          micro_batch=batch, precision=precision, zero_stage=args.zero_stage,
                          steps=args.steps, warmup=args.warmup)
        result = measure_cell(pfc_cell(rate), args.classes, setting, for_memory=False)
        rows.append({**row, **({"error": result["error"]} if "error" in result else
                               {"samples_per_s": result["samples_per_s"], "peak_mib": result["peak_bytes"] / 2**20})})
    return rows


# -- the report ----------------------------------------------------------------------------------
def render(args, spec: list[tuple[str, str]], rows: list[dict], plot_name: str | None) -> str:
    yes = lambda flag: "√" if flag else "×"  # noqa: E731  (the seeds' marks)
    table = [[f"{args.classes:,}", args.backbone, f"{r['batch']} x {args.world_size}", yes(r["precision"] == "fp16"),
              yes(r["precision"] == "bf16"), yes(r["precision"] == "tf32"), yes(r["sample_rate"] < 1.0),
              f"~{r['samples_per_s']:,.0f}" if "samples_per_s" in r else "failed (below)"]
             for r in rows if "not_measured" not in r]  # precisions this machine lacks: listed below
    measured = {(r["batch"], r["precision"], r["sample_rate"]): r["samples_per_s"] for r in rows if "samples_per_s" in r}
    ratios = [[f"{b} x {args.world_size}", prec, f"{measured[(b, prec, args.sample_rate)] / measured[(b, prec, 1.0)]:.2f}"]
              for prec in args.precisions for b in args.batch_sizes
              if (b, prec, 1.0) in measured and (b, prec, args.sample_rate) in measured]
    skipped = sorted({f"{r['precision']}: {r['not_measured']}" for r in rows if "not_measured" in r})
    skipped += [f"{r['precision']}, batch {r['batch']} x {args.world_size}, sample rate {r['sample_rate']:g}: "
                f"failed: {r['error']}" for r in rows if "error" in r]
    lines = [f"# Training performance report: {spec[2][1] if 'none' not in spec[2][1] else spec[0][1]}", "",
             f"Written by `python -m ds_face.bench report` on {datetime.date.today().isoformat()}.", "",
             "## Test Server Spec", "", markdown_table(["Key", "Value"], [list(kv) for kv in spec]), "",
             "## Experiments on ds_face", "",
             "1. The training data is synthetic (random images and labels, generated before the timers).",
             f"2. Embedding size {args.embedding}; the backbone under DeepSpeed ZeRO stage {args.zero_stage}; "
             f"{args.world_size} ranks; batch size is per rank x ranks.",
             f"3. Partial FC √ is sample rate {args.sample_rate:g}; × is model parallel (every class centre every "
             "step, the head still sharded over ranks).",
             f"4. Each figure: {args.warmup} warm-up + {args.steps} timed steps in fresh processes; samples/s = "
             "global batch / the slowest rank's mean step time.", "",
             markdown_table(["Classes", "Backbone", "Batch-size", "FP16", "BF16", "TF32", "Partial FC", "Samples/sec"],
                            table)]
    if ratios:
        lines += ["", "Partial FC on / off, same batch and precision (same run):", "",
                  markdown_table(["Batch-size", "Precision", "Samples/s ratio"], ratios)]
    if skipped:
        lines += ["", "Not measured:", ""] + [f"- {line}" for line in skipped]
    if plot_name:
        lines += ["", f"![samples/s against batch size]({plot_name})"]
    return "\n".join(lines) + "\n"


def plot(args, rows: list[dict], path: Path) -> bool:
    """samples/s against batch size, a line per precision x Partial FC; False if nothing was measured."""
    import matplotlib
    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt
    lines = {}
    for r in rows:
        if "samples_per_s" in r:
            label = f"{r['precision']}, " + (f"Partial FC {args.sample_rate:g}" if r["sample_rate"] < 1 else "model parallel")
            lines.setdefault(label, []).append((r["batch"] * args.world_size, r["samples_per_s"]))
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in lines.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", linestyle="--" if "model parallel" in label else "-", label=label)
    ax.set_xlabel(f"global batch ({args.world_size} ranks)")
    ax.set_ylabel("samples/s")
    ax.set_title(f"{args.backbone}, {args.classes:,} classes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from ds_face.fileio import write_atomic
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    from ds_face.fileio import write_atomic
    spec = machine_spec()
    rows = measure(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plotted = not args.no_plot and plot(args, rows, png)
    text = render(args, spec, rows, png.name if plotted else None)
    write_atomic(out, text.encode())
    print(text)
    print(f"wrote {out}" + (f" and {png}" if plotted else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
