"""The ``memory`` command's plot: memory per device against the class count, a line per cell.

    python -m ds_face.bench.plots RESULTS.json OUT.png    # re-draw from `memory --json RESULTS.json` (no measuring)

Readable at a glance: every cell has its own colour, marker and line style, markers shrink from the first cell
to the last so that cells with the same figures (DP ZeRO-0/1/2 when the head is one parameter) stay visible one
inside the other, and such a cell says which one it equals in the legend; the legend sits outside the axes; the
y axis switches to GiB past 10 GiB and to a log scale when the figures span more than 20x, so nothing is
clipped.
"""
from __future__ import annotations

import json
import sys

from ds_face.bench.estimator import MiB

GiB = 1024 * MiB
# (marker, line style) per cell, in order
STYLES = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", (0, (6, 2))), ("P", (0, (3, 1, 1, 1))),
          ("X", (0, (1, 1))), ("*", (0, (8, 2, 2, 2)))]
SAME = 0.01  # relative difference under which two cells' figures are the same


def _same_as(series: dict[str, list[float]]) -> dict[str, str]:
    """cell -> the first earlier cell whose figures all lie within SAME of its own."""
    out, names = {}, list(series)
    for i, cell in enumerate(names):
        for other in names[:i]:
            if all(abs(a - b) <= SAME * max(abs(a), abs(b), 1) for a, b in zip(series[cell], series[other])):
                out[cell] = out.get(other, other)
                break
    return out


def plot(path: str, estimates: dict, device_bytes: int | None, title: str, measured: dict | None = None) -> None:
    """Memory per device against the class count (log scale), a line per cell; written atomically."""
    import matplotlib
    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    from ds_face.fileio import write_atomic
    classes = list(estimates)
    cells = list(estimates[classes[0]])
    series = {cell: [estimates[c][cell]["total_bytes"] for c in classes] for cell in cells}
    points = {cell: [(c, measured[c][cell]["peak_bytes"]) for c in classes if "peak_bytes" in measured[c][cell]]
              for cell in cells} if measured else {}
    values = [v for s in series.values() for v in s] + [v for p in points.values() for _, v in p]
    values += [device_bytes] if device_bytes else []
    unit, scale = ("GiB", GiB) if max(values) >= 10 * GiB else ("MiB", MiB)
    same = _same_as(series)

    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    for i, cell in enumerate(cells):
        marker, style = STYLES[i % len(STYLES)]
        size = 11 - 6 * i / max(len(cells) - 1, 1)  # the first cell's markers largest: equal ones nest
        label = cell + (f"  (= {same[cell]})" if cell in same else "")
        line, = ax.plot(classes, [v / scale for v in series[cell]], marker=marker, linestyle=style, markersize=size,
                        linewidth=1.4, alpha=0.9, label=label)
        if points.get(cell):
            xs, ys = zip(*points[cell])
            ax.plot(xs, [y / scale for y in ys], marker=marker, linestyle="none", markersize=size + 3,
                    markerfacecolor="none", markeredgewidth=1.6, color=line.get_color())
    handles, labels = ax.get_legend_handles_labels()
    if device_bytes:
        budget = ax.axhline(device_bytes / scale, color="black", linestyle="--", linewidth=1)
        handles.append(budget)
        labels.append(f"budget {device_bytes / scale:,.{1 if unit == 'GiB' else 0}f} {unit}")
    if measured:
        handles += [Line2D([], [], color="gray", marker="o", linestyle="-"),
                    Line2D([], [], color="gray", marker="o", linestyle="none", markerfacecolor="none",
                           markersize=11, markeredgewidth=1.6)]
        labels += ["estimated (line, filled)", "measured (hollow)"]
    ax.set_xscale("log")
    if max(values) / min(v for v in values if v > 0) > 20:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, max(values) / scale * 1.08)
    ax.set_xticks(classes)
    ax.set_xticklabels([_short(c) for c in classes], rotation=45 if len(classes) > 6 else 0)
    ax.xaxis.set_minor_locator(NullLocator())  # the class counts drawn are the ticks
    if ax.get_yscale() == "log":  # plain numbers (0.5, 2, 10) at 1-2-5 steps, not 10^x
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,g}"))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("classes")
    ax.set_ylabel(f"{unit} per device" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
              frameon=False)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def _short(classes: int) -> str:
    if classes >= 1_000_000:
        return f"{classes / 1e6:g}M"
    return f"{classes / 1e3:g}K" if classes >= 1000 else str(classes)


def replot(results_path: str, out: str) -> None:
    """Draw ``out`` from what ``python -m ds_face.bench memory --json`` wrote, as that command draws it."""
    with open(results_path) as f:
        data = json.load(f)
    s = data["setting"]
    title = f"{s['backbone']}, {s['world_size']} ranks x micro-batch {s['micro_batch']}, {s['precision']}, {s['optimizer']}"
    by_classes = lambda table: {int(c): per for c, per in table.items()}  # noqa: E731  JSON keys are strings
    if "measured" in data:
        estimates = {int(c): {cell: {"total_bytes": b} for cell, b in per.items()}
                     for c, per in data["measured_vs"].items()}
        plot(out, estimates, data.get("device_memory_bytes"), title + " (measured and estimated)",
             by_classes(data["measured"]))
    else:
        plot(out, by_classes(data["results"]), data.get("device_memory_bytes"), title + " (estimated)")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.split("\n\n")[1].strip())
        sys.exit(0 if len(sys.argv) == 2 else 2)
    replot(sys.argv[1], sys.argv[2])
