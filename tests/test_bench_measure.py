"""Measured cells (ds_face.bench memory --measure, speed, report): real ranks, real steps, no timing assertions."""
import json
import os
from pathlib import Path

import pytest

from ds_face.bench import memory, report, speed
from ds_face.runtime.spawn import run_ranks


def test_measured_head_cells_agree_with_the_estimate_within_10_percent(tmp_path, capsys):
    """The issue's bar: on 2 CPU ranks with a small backbone, head-dominated cells within 10%."""
    out = tmp_path / "m.json"
    code = memory.main(["--backbone", "r_tiny", "--world-size", "2", "--micro-batch", "8", "--precision", "fp32",
                        "--classes", "150000", "--cells", "Model parallel,Partial FC 0.1,DP ZeRO-1",
                        "--overhead-mb", "0", "--device-memory", "600MB", "--measure", "--steps", "1",
                        "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    data = json.loads(out.read_text())
    measured, estimated = data["measured"]["150000"], data["measured_vs"]["150000"]
    for cell in ("Model parallel", "Partial FC 0.1"):
        peak = measured[cell]["peak_bytes"]
        assert abs(estimated[cell] - peak) / peak <= 0.10, (cell, peak, estimated[cell])
        assert measured[cell]["finite_loss"] and measured[cell]["samples_per_s"] > 0
    # the FC inside the engine trains too, and Partial FC holds less than model parallel, which holds less
    assert measured["DP ZeRO-1"]["finite_loss"]
    assert measured["Partial FC 0.1"]["peak_bytes"] < measured["Model parallel"]["peak_bytes"] \
        < measured["DP ZeRO-1"]["peak_bytes"]
    # the printed tables: measured MiB ('-' above the 600 MB budget) and measured / estimated with the error
    assert "Measured MiB per device" in text and "Measured / estimated MiB" in text and "samples/s" in text
    row = next(ln for ln in text.split("Measured MiB per device")[1].splitlines() if ln.startswith("| 150,000"))
    dp = measured["DP ZeRO-1"]["peak_bytes"] / 2**20
    assert row.strip("| ").split(" | ")[3] == ("-" if dp > 600 else f"{dp:,.0f}")


def test_no_shared_memory_left_behind():
    """DeepSpeed's CPU all-reduce buffers in /dev/shm (66 MB a rank, never unlinked by DeepSpeed) are gone."""
    ports = run_ranks(2, _master_port)
    leftovers = [p for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{ports[0]}_*")]
    assert leftovers == []


def _master_port(rank, world_size):
    return os.environ["MASTER_PORT"]


def test_report_writes_markdown_and_plot(tmp_path, capsys):
    from ds_face.bench.cells import unsupported
    out = tmp_path / "reports" / "cpu.md"
    assert report.main(["--out", str(out), "--classes", "2000", "--batch-sizes", "4", "--precisions", "fp32,fp16",
                        "--steps", "1", "--warmup", "0"]) == 0
    text = out.read_text()
    for key in ("| CPU |", "| Memory |", "| GPU |", "| OS |", "PyTorch", "DeepSpeed", "Python", "CUDA"):
        assert key in text
    fp32_rows = [ln for ln in text.splitlines() if ln.startswith("| 2,000 | r_tiny | 4 x 2 | × | × | × |")]
    assert len(fp32_rows) == 2 and all("~" in ln for ln in fp32_rows)  # Partial FC off and on, measured
    assert "Partial FC on / off" in text
    if unsupported("fp16"):
        assert f"- fp16: {unsupported('fp16')}" in text
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an existing report is not replaced without --overwrite
    with pytest.raises(SystemExit) as err:
        report.main(["--out", str(out)])
    assert err.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_text() == text


@pytest.mark.parametrize("argv, message", [
    (["--backbone", "r51"], "unknown backbone 'r51'"),
    (["--world-size", "0"], "--world-size must be a positive integer"),
    (["--classes", "1e6"], "classes must be a comma-separated list of positive integers"),
    (["--classes", "100,-5"], "classes must be a comma-separated list of positive integers"),
    (["--device-memory", "32 gigs"], "cannot parse memory size"),
    (["--cells", "DP ZeRO-4"], "unknown cell 'DP ZeRO-4'"),
    (["--precision", "fp32", "--cells", "Partial FC 0.1", "--baseline", "Model parallel"], "is not one of the cells"),
    (["--world-size", "4", "--classes", "3"], "3 classes cannot be split over 4 ranks"),
])
def test_speed_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        speed.main(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--backbone", "resnet"], "unknown backbone 'resnet'"),
    (["--world-size", "0"], "--world-size must be a positive integer"),
    (["--batch-sizes", "32,x"], "--batch-sizes must be a comma-separated list of positive integers"),
    (["--precisions", "fp8"], "unknown precision 'fp8'"),
    (["--sample-rate", "1.0"], "--sample-rate must be in (0, 1)"),
])
def test_report_bad_input(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        report.main(["--out", str(tmp_path / "r.md"), *argv])
    assert err.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_speed_table_and_ratio_to_the_baseline(tmp_path, capsys):
    out = tmp_path / "s.json"
    assert speed.main(["--backbone", "r_tiny", "--world-size", "2", "--micro-batch", "4", "--precision", "fp32",
                       "--classes", "2000", "--cells", "Model parallel,Partial FC 0.1", "--steps", "1",
                       "--warmup", "0", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    measured = json.loads(out.read_text())["measured"]["2000"]
    rates = {cell: measured[cell]["samples_per_s"] for cell in ("Model parallel", "Partial FC 0.1")}
    assert all(r > 0 for r in rates.values())
    ratio_row = text.split("Each cell / Model parallel")[1].splitlines()[4]
    assert ratio_row == f"| 2,000 | 1.00 | {rates['Partial FC 0.1'] / rates['Model parallel']:.2f} |"
