"""Where an IJB-B/C release keeps its files (InsightFace's layout): known to the config check, which must not
import the evaluation itself, and to ds_face.ijb."""
from __future__ import annotations

import os
from pathlib import Path


def meta_files(root: str | os.PathLike, target: str) -> dict[str, Path]:
    meta = Path(root) / "meta"
    t = target.lower()
    return {"landmarks": meta / f"{t}_name_5pts_score.txt", "templates": meta / f"{t}_face_tid_mid.txt",
            "pairs": meta / f"{t}_template_pair_label.txt"}


def check_layout(root: str | os.PathLike, target: str) -> list[str]:
    """What is missing from an IJB release directory (cheap: existence only); [] when complete."""
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: no such directory (expected an IJB release: loose_crop/ and meta/)"]
    problems = [] if (root / "loose_crop").is_dir() else [f"{root / 'loose_crop'}: no such directory"]
    return problems + [f"{path}: no such file" for path in meta_files(root, target).values() if not path.is_file()]
