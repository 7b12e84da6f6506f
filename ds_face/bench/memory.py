"""Memory per device, estimated (and measured with --measure): the classification layer inside ZeRO vs outside.

The ``python -m ds_face.bench memory`` command: prints the estimator's table (``estimator``) for a grid of
class counts x cells (``cli``), and with ``--measure`` the measured figures beside it (``cells``). Usage and
the formulas: BENCHMARKS.md.
"""
from __future__ import annotations

import sys
import textwrap

from ds_face.bench import cli
from ds_face.runtime.markdown import markdown_table
from ds_face.bench.estimator import (MiB, PRECISIONS, SEED_NOTE, activation_elements_per_sample, backbone_params,
                                     breakdown_table, off_device_table, seed_comparison, storage_table, table)


def measured_tables(measured: dict, estimates: dict, device_bytes: int | None) -> tuple[str, str]:
    """(measured MiB per device, '-' over the budget or failed; measured vs estimated with the error)."""
    cells = list(next(iter(measured.values())))
    rows, errors = [], []
    for c, per_cell in measured.items():
        row, err = [f"{c:,}"], [f"{c:,}"]
        for cell in cells:
            m, e = per_cell[cell], estimates[c][cell]["total_bytes"]
            if "peak_bytes" in m:
                fits = device_bytes is None or m["peak_bytes"] <= device_bytes
                row.append(f"{m['peak_bytes'] / MiB:,.0f}" if fits else "-")
                err.append(f"{m['peak_bytes'] / MiB:,.0f} / {e / MiB:,.0f} ({(e - m['peak_bytes']) / m['peak_bytes']:+.0%})")
            else:
                row.append("-")
                err.append(f"not run / {e / MiB:,.0f}" if "skipped" in m else f"failed / {e / MiB:,.0f}")
        rows.append(row)
        errors.append(err)
    return markdown_table(["classes"] + cells, rows), markdown_table(["classes"] + cells, errors)


def main(argv=None) -> int:
    p = cli.build_parser("python -m ds_face.bench memory", __doc__.splitlines()[0])
    args = p.parse_args(argv)
    classes, cells, device, kw = cli.parse_grid(p, args)
    text, results = table(classes, cells, device, **kw)
    act = kw["activation_bytes_per_sample"]
    per_sample = act if act is not None else \
        activation_elements_per_sample(args.backbone, args.embedding) * PRECISIONS[args.precision]
    budget = f", budget {device / MiB:,.0f} MiB" if device else ""
    print(f"{args.backbone} ({backbone_params(args.backbone, args.embedding) / 1e6:.1f}M params), embedding "
          f"{args.embedding}, {args.world_size} ranks x micro-batch {args.micro_batch}, {args.precision}, "
          f"{args.optimizer}; head storage {args.storage}, {args.storage_dtype}; activations "
          f"{per_sample / MiB:.1f} MiB/sample, overhead {args.overhead_mb:g} MiB{budget}. "
          "Estimated MiB per device ('-': over budget):\n")
    print(text)
    if args.storage != "device":
        print(f"\nThe head's MiB per rank off the device, host / disk (--storage {args.storage}: the tables "
              f"{'in host memory' if args.storage == 'host' else 'on local disk'}, plus the host's staging of the "
              "rows a step writes back):\n\n" + off_device_table(results))
    if args.breakdown:
        print("\nBreakdown (MiB per device):\n\n" + breakdown_table(results))
    out = {"setting": {k: v for k, v in kw.items()}, "device_memory_bytes": device,
           "activation_bytes_per_sample": per_sample,
           "results": {str(c): r for c, r in results.items()}}
    if args.compare_seed:
        seed_text, seed_data = seed_comparison(args.overhead_mb * MiB, act)
        print(f"\nSeed comparison ({cli.SEED_BENCHMARK}; MiB per GPU; estimates in parentheses exceed "
              "32510 MiB):\n\n" + seed_text + "\n\n"
              + textwrap.fill(" ".join(SEED_NOTE.split()), 110))
        out["seed_comparison"] = {str(c): d for c, d in seed_data.items()}
        placed_text, published_text, placed = storage_table(args.overhead_mb * MiB, act)
        print("\nWhere the head lives (head.storage, head.storage_dtype), estimated MiB per rank at the seed's "
              "setting (r50, 8 GPUs, fp16, SGD); the last two rows are the 100M-identity setting that fits 16 GiB "
              "per GPU:\n\n" + placed_text + "\n\nPublished per-GPU figures (quoted from REFERENCE.md and issue "
              "26) beside the estimator at the same setting where the source gives it:\n\n" + published_text)
        out["storage_comparison"] = placed
    if args.measure:
        measured, estimates, calibration = cli.run_measured(classes, cells, kw, args)
        measured_text, error_text = measured_tables(measured, estimates, device)
        from ds_face.bench.cells import host_memory_available
        where = ("peak resident memory above each rank's baseline" if host_memory_available() is not None
                 else "peak allocated accelerator memory above each rank's baseline")
        act_note = (f"activations measured once: {calibration['measured_bytes_per_sample'] / MiB:.2f} MiB/sample "
                    f"(leaf-module count: {calibration['leaf_module_bytes_per_sample'] / MiB:.2f})"
                    if "measured_bytes_per_sample" in calibration else
                    f"activations {act / MiB:.2f} MiB/sample as given")
        print(f"\nMeasured MiB per device ({where}, the largest rank; "
              f"{args.warmup} + {args.steps} steps per cell; '-': over budget, failed or not run):\n\n"
              f"{measured_text}\n\nMeasured / estimated MiB (estimate error), estimates without overhead and with "
              f"{act_note}:\n\n{error_text}")
        from ds_face.bench.speed import speed_tables
        speed, ratios = speed_tables(measured, "Model parallel" if "Model parallel" in cells else None)
        print(f"\nMeasured samples/s (the same steps, with glibc returning freed memory at once, which the memory "
              f"figures need and which slows CPU steps; `python -m ds_face.bench speed` measures without):\n\n{speed}"
              + (f"\n\nEach cell / Model parallel:\n\n{ratios}" if ratios else ""))
        notes = cli.cell_notes(measured)
        if notes:
            print("\n" + notes)
        out["measured"] = {str(c): r for c, r in measured.items()}
        out["measured_vs"] = {str(c): {cell: r["total_bytes"] for cell, r in per.items()} for c, per in estimates.items()}
        out["calibration"] = calibration
    if args.json:
        from ds_face.fileio import write_json_atomic
        write_json_atomic(args.json, out)
    if args.plot:
        title = (f"{args.backbone}, {args.world_size} ranks x micro-batch {args.micro_batch}, {args.precision}, "
                 f"{args.optimizer}")
        from ds_face.bench.plots import plot
        if args.measure:  # the estimates the measurement is compared with (no overhead, measured activations)
            plot(args.plot, estimates, device, title + " (measured and estimated)", measured)
        else:
            plot(args.plot, results, device, title + " (estimated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
