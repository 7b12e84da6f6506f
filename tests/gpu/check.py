"""``make gpu-check`` (``python -m tests.gpu.check``): the GPU path proved in one run, one markdown report.

On a machine with NVIDIA GPUs it runs every check of ``tests/gpu/checks.py`` on every visible GPU (world size
= GPU count; one GPU is a valid world) and writes ``reports/gpu-check-<hostname>.md``: the machine, a summary
(check, passed/FAILED, seconds) and what each check measured. Exit status 1 if any check failed. Without a
CUDA device it says so, lists the checks it would run, and exits 0 (nothing is written).

Sized for under 10 minutes on one GPU (``--quick``: r50 only, fewer bench cells); ``--only``/``--skip`` pick
checks. The same checks run under pytest: ``pytest -m gpu tests/gpu`` (skipped elsewhere: "no CUDA device").
"""
from __future__ import annotations

import argparse
import datetime
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ds_face.bench import DefaultsHelpFormatter
from tests.gpu.checks import BY_NAME, ROOT, CheckFailed, Context

DEFAULT_OUT = f"reports/gpu-check-{socket.gethostname()}.md"


def gpu_count() -> int:
    """Visible CUDA devices, counted without opening a CUDA context (NVML): 0 without a GPU or a CUDA build."""
    import torch
    return torch.cuda.device_count()


def _names(text: str, p: argparse.ArgumentParser, flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in BY_NAME]
    if bad or not names:
        p.error(f"{flag}: unknown check {bad[0] if bad else text!r}; valid: {', '.join(BY_NAME)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.gpu.check", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="the markdown report to write (relative to the repository)")
    p.add_argument("--only", metavar="NAMES", help=f"only these checks, comma-separated (of {', '.join(BY_NAME)})")
    p.add_argument("--skip", metavar="NAMES", help="all checks but these, comma-separated")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--quick", action="store_true", help="speed: r50 only; bench report: fp16 only")
    p.add_argument("--backbones", default="r50,r100", help="speed: backbones, comma-separated")
    p.add_argument("--classes", type=int, default=1_000_000, help="speed and bench: identities of the synthetic data")
    p.add_argument("--batch", type=int, default=128, help="speed and bench: micro-batch per GPU")
    p.add_argument("--steps", type=int, default=20, help="speed: timed steps per loop")
    p.add_argument("--warmup", type=int, default=5, help="speed: untimed steps first")
    p.add_argument("--workdir", help="scratch directory for checkpoints and exports (default: a fresh temporary one)")
    args = p.parse_args(argv)
    if args.only and args.skip:
        p.error("--only and --skip together: give one")
    chosen = _names(args.only, p, "--only") if args.only else list(BY_NAME)
    skipped = _names(args.skip, p, "--skip") if args.skip else []
    args.checks = [name for name in BY_NAME if name in chosen and name not in skipped]  # in the run's order
    for label, value in (("--classes", args.classes), ("--batch", args.batch), ("--steps", args.steps)):
        if value <= 0:
            p.error(f"{label} must be a positive integer, got {value}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    from ds_face.backbones import BACKBONES
    args.backbones = ["r50"] if args.quick else [b.strip() for b in args.backbones.split(",") if b.strip()]
    bad = [b for b in args.backbones if b not in BACKBONES] or ([] if args.backbones else ["(none)"])
    if bad:
        p.error(f"--backbones: unknown backbone {bad[0]!r}; valid names: {', '.join(BACKBONES)}")
    return args


def check_list(names: list[str]) -> str:
    return "\n".join(f"  {name:7s} {BY_NAME[name].title}" for name in names)


def render(spec: list[tuple[str, str]], ctx: Context, outcomes: list[tuple[str, str, float, str]],
           seconds: float, where: str) -> str:
    """The report: ``outcomes`` are (check name, "passed"/"FAILED", seconds, markdown body)."""
    from ds_face.runtime.markdown import markdown_table
    failed = [name for name, status, _, _ in outcomes if status != "passed"]
    lines = [f"# GPU check: {where}", "",
             f"Written by `make gpu-check` (`python -m tests.gpu.check`) on {datetime.date.today().isoformat()}: "
             f"{len(outcomes)} check(s), {len(failed)} failed, {seconds / 60:.1f} min in all; world size "
             f"{ctx.world_size}.", "", "## Machine", "", markdown_table(["Key", "Value"], [list(kv) for kv in spec]),
             "", "## Summary", "",
             markdown_table(["check", "what", "result", "seconds"],
                            [[name, BY_NAME[name].title, status, f"{s:.0f}"] for name, status, s, _ in outcomes])]
    for name, status, s, body in outcomes:
        lines += ["", f"## {BY_NAME[name].title}: {status}", "", body.strip()]
    return "\n".join(lines) + "\n"


def run(ctx: Context, names: list[str]) -> list[tuple[str, str, float, str]]:
    outcomes = []
    for name in names:
        print(f"gpu-check: {name}: {BY_NAME[name].title} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            body, status = BY_NAME[name].run(ctx), "passed"
        except Exception as err:  # noqa: BLE001  (any failure is this check's, reported; the others still run)
            body = f"```\n{''.join(traceback.format_exception(err)[-12:]).strip()}\n```"
            if isinstance(err, CheckFailed):  # what it measured before it failed, then why
                body = f"{err.body}\n\n{body}"
            status = "FAILED"
        seconds = time.perf_counter() - started
        print(f"gpu-check: {name}: {status} ({seconds:.0f} s)", file=sys.stderr, flush=True)
        outcomes.append((name, status, seconds, body))
    return outcomes


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print(f"checks (in order):\n{check_list(args.checks)}")
        return 0
    count = gpu_count()
    if count == 0:
        print("gpu-check: no CUDA device is present (torch.cuda.device_count() == 0): nothing was run and no report "
              f"was written.\nOn a machine with NVIDIA GPUs it runs, on every visible GPU, and writes {args.out}:\n"
              f"{check_list(args.checks)}")
        return 0
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ds_face_gpu_check_"))
    ctx = Context(world_size=count, workdir=workdir, classes=args.classes, batch=args.batch,
                  backbones=tuple(args.backbones), warmup=args.warmup, steps=args.steps,
                  bench_precisions=("fp16",) if args.quick else ("tf32", "fp16", "bf16"))
    started = time.perf_counter()
    outcomes = run(ctx, args.checks)  # "parent" is the last check: after every other one
    from ds_face.bench.report import machine_spec
    spec = machine_spec()  # the GPUs are asked in a child process
    text = render(spec, ctx, outcomes, time.perf_counter() - started, spec[2][1])
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from ds_face.fileio import write_atomic
    write_atomic(out, text.encode())
    print(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0 if all(status == "passed" for _, status, _, _ in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
