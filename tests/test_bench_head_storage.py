"""``python -m ds_face.bench head-storage`` runs as a user runs it, at tiny sizes, and prints every cell's
figures (their values are the benchmark's business, not the test's: no timing or memory assertions)."""
import json
import sys

from ds_face.runtime.spawn import run_command
from tests.conftest import ROOT

BENCH = [sys.executable, "-m", "ds_face.bench", "head-storage"]


def test_head_storage_table_has_every_cell_with_positive_figures(tmp_path):
    out = tmp_path / "cells.json"
    run = run_command([*BENCH, "--classes", "20000,40000", "--rows", "512", "--embedding", "16", "--batch", "8",
                       "--steps", "2", "--warmup", "1", "--storage-dir", str(tmp_path / "scratch"), "--json", str(out)],
                      cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| identities"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "identities", "storage", "stored MiB/rank", "rows/step/rank", "peak RssAnon MiB/rank",
        "peak above start MiB/rank", "step ms (median)", "time / device"]
    rows = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert [(r.split("|")[1].strip(), r.split("|")[2].strip()) for r in rows] == [
        (c, s) for c in ("20,000", "40,000") for s in ("device", "host", "disk")]
    assert any(line.startswith("disk, 40,000 / 20,000 identities: peak RssAnon x") for line in lines)
    cells = json.loads(out.read_text())["cells"]
    for cell in cells:
        for key in ("store_mib", "rows", "peak_mib", "step_ms"):
            assert cell[key] > 0, (cell, key)
        assert cell["above_start_mib"] >= 0
        assert 0 < cell["sample_rate"] < 1
    assert not any((tmp_path / "scratch").iterdir())  # disk storage left no file behind


def test_head_storage_loss_curve_compares_every_dtype_to_the_first(tmp_path):
    out = tmp_path / "curves.json"
    run = run_command([*BENCH, "--loss-curve", "--dtypes", "float32,bfloat16", "--train-steps", "3",
                       "--train-classes", "40", "--micro-batch", "4", "--world-size", "1", "--json", str(out)],
                      cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    curves = json.loads(out.read_text())["curves"]
    assert list(curves) == ["float32", "bfloat16"]
    assert all(len(losses) == 3 and all(loss > 0 for loss in losses) for losses in curves.values())
    summary = [line for line in run.stdout.splitlines() if line.startswith(("| float32 ", "| bfloat16 "))]
    assert len(summary) == 2 and "| 0.0000 |" in summary[0]  # float32 against itself: no difference


def test_head_storage_help_imports_no_torch():
    probe = "\n".join(["import sys", "from ds_face.bench.__main__ import main", "try:",
                        "    main(['head-storage', '--help'])", "except SystemExit as stop:",
                        "    print('EXIT', stop.code)", "print('TORCH', 'torch' in sys.modules)"])
    run = run_command([sys.executable, "-c", probe], cwd=ROOT, timeout=60)
    assert "EXIT 0" in run.stdout and "TORCH False" in run.stdout, run.stdout + run.stderr
    assert "--loss-curve" in run.stdout and "--storage-dir" in run.stdout
