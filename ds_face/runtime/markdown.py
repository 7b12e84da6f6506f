"""The one markdown table every report prints (evaluation, IJB, benchmarks, data_prep's benchmarks)."""
from __future__ import annotations


def markdown_table(header: list[str], rows: list[list], align: str = "") -> str:
    """A GitHub markdown table; ``align`` has one letter per column, ``l`` (the default) or ``r`` (numbers)."""
    align = align or "l" * len(header)
    if len(align) != len(header) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r}: one letter, l or r, for each of the {len(header)} columns")
    rule = ["---:" if a == "r" else "---" for a in align]
    return "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in [header, rule, *rows])
