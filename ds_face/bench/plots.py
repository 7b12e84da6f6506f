"""The ``memory`` command's plot: MiB per device against the class count, a line per cell."""
from __future__ import annotations

from ds_face.bench.estimator import MiB


def plot(path: str, estimates: dict, device_bytes: int | None, title: str, measured: dict | None = None) -> None:
    """MiB per device against the class count (log scale), a line per cell; written atomically."""
    import matplotlib
    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    from ds_face.fileio import write_atomic
    classes = list(estimates)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cell in estimates[classes[0]]:
        line, = ax.plot(classes, [estimates[c][cell]["total_bytes"] / MiB for c in classes], marker=".",
                        label=f"{cell} (estimated)")
        if measured:
            points = [(c, measured[c][cell]["peak_bytes"] / MiB) for c in classes if "peak_bytes" in measured[c][cell]]
            if points:
                ax.plot(*zip(*points), "o", color=line.get_color(), label=f"{cell} (measured)")
    if device_bytes:
        ax.axhline(device_bytes / MiB, color="black", linestyle="--", linewidth=1,
                   label=f"budget {device_bytes / MiB:,.0f} MiB")
        highest = max(r["total_bytes"] for per in estimates.values() for r in per.values()) / MiB
        ax.set_ylim(0, min(highest, 3 * device_bytes / MiB) * 1.05)  # the budget region, not 300 GB at 29M classes
    ax.set_xscale("log")
    ax.set_xlabel("classes")
    ax.set_ylabel("MiB per device")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)

