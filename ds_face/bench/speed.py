"""Measured training speed per cell: samples/s for each class count x cell, and each cell / a baseline cell.

    python -m ds_face.bench speed --backbone r_tiny --classes 200000,1000000 --world-size 2 --micro-batch 32 \\
        --precision fp32 [--cells 'DP ZeRO-0,Model parallel,Partial FC 0.1'] [--baseline 'Model parallel']

Same options and cells as ``python -m ds_face.bench memory`` (see there and ``ds_face.bench.cells``): each
cell runs ``--warmup`` + ``--steps`` real training steps on ``--world-size`` fresh local ranks with synthetic
data; samples/s = world size x micro-batch / the slowest rank's mean step time. The ratio table divides each
cell by the baseline cell of the same class count, measured in the same run. '-': failed (e.g. out of
memory) or not run (would not fit in host memory on CPU).
"""
from __future__ import annotations

import sys

from ds_face.bench import cli
from ds_face.runtime.markdown import markdown_table


def speed_tables(measured: dict, baseline: str | None) -> tuple[str, str | None]:
    """(samples/s per cell; each cell / the baseline cell, or None without a baseline)."""
    cells = list(next(iter(measured.values())))
    rows, ratios = [], []
    for c, per_cell in measured.items():
        speed = {cell: m.get("samples_per_s") for cell, m in per_cell.items()}
        rows.append([f"{c:,}"] + [f"{v:,.1f}" if v else "-" for v in speed.values()])
        base = speed.get(baseline) if baseline else None
        ratios.append([f"{c:,}"] + [f"{v / base:.2f}" if v and base else "-" for v in speed.values()])
    text = markdown_table(["classes"] + cells, rows)
    return text, markdown_table(["classes"] + cells, ratios) if baseline else None


def main(argv=None) -> int:
    p = cli.build_parser("python -m ds_face.bench speed", __doc__.splitlines()[0], measure_flag=False)
    p.add_argument("--baseline", default="Model parallel", help="the cell the ratios divide by")
    args = p.parse_args(argv)
    classes, cells, _, kw = cli.parse_grid(p, args)
    if args.baseline not in cells:
        p.error(f"--baseline {args.baseline!r} is not one of the cells: {', '.join(cells)}")
    measured, _, _ = cli.run_measured(classes, cells, kw, args, for_memory=False)
    text, ratios = speed_tables(measured, args.baseline)
    print(f"{args.backbone}, embedding {args.embedding}, {args.world_size} ranks x micro-batch {args.micro_batch}, "
          f"{args.precision}, {args.optimizer}; {args.warmup} + {args.steps} steps per cell. Samples/s:\n\n{text}\n\n"
          f"Each cell / {args.baseline} (same run):\n\n{ratios}")
    notes = cli.cell_notes(measured)
    if notes:
        print("\n" + notes)
    if args.json:
        from ds_face.fileio import write_json_atomic
        write_json_atomic(args.json, {"setting": kw, "measured": {str(c): r for c, r in measured.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
