"""`make gpu-check` (tests/gpu/check.py) on a machine without a GPU: it says so and exits 0; its options and its
check list; and its code run on CPU at a tiny size: the plain-PyTorch speed baseline against ds_face's step
(both on real CPU ranks, labelled CPU: these figures say nothing about a GPU), the report writer, a check that
fails being reported as FAILED. The GPU checks themselves (tests/gpu/test_gpu.py) are skipped here: no CUDA
device."""
import math

import pytest

from tests.gpu import check
from tests.gpu.checks import CHECKS, SPEED_HEADER, Context

ISSUE_CHECKS = ["nccl", "engine", "head", "head_storage", "resume", "export", "launch", "speed", "bench", "parent"]


def test_the_check_list_covers_the_issue():
    assert [c.name for c in CHECKS] == ISSUE_CHECKS
    args = check.parse_args([])
    assert args.checks == ISSUE_CHECKS and args.backbones == ["r50", "r100"]
    assert (args.classes, args.batch, args.steps, args.warmup) == (1_000_000, 128, 20, 5)
    assert args.out.startswith("reports/gpu-check-") and args.out.endswith(".md")
    assert check.parse_args(["--quick"]).backbones == ["r50"]
    assert check.parse_args(["--skip", "speed,bench"]).checks == [n for n in ISSUE_CHECKS if n not in ("speed", "bench")]
    assert check.parse_args(["--only", "head,nccl"]).checks == ["nccl", "head"]  # always in the run's order


def test_without_a_gpu_it_says_so_lists_the_checks_and_exits_0(capsys, tmp_path):
    if check.gpu_count():
        pytest.skip("a CUDA device is present: make gpu-check runs the checks for real")
    out = tmp_path / "r.md"
    assert check.main(["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "no CUDA device is present" in text and "nothing was run" in text
    for c in CHECKS:
        assert f"  {c.name}" in text and c.title in text
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--only", "foo"], "--only: unknown check 'foo'; valid: nccl, engine"),
    (["--skip", "nccl,gpu"], "--skip: unknown check 'gpu'"),
    (["--only", "nccl", "--skip", "head"], "--only and --skip together"),
    (["--classes", "0"], "--classes must be a positive integer, got 0"),
    (["--steps", "-1"], "--steps must be a positive integer"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--backbones", "r50,r51"], "--backbones: unknown backbone 'r51'"),
])
def test_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        check.parse_args(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_speed_check_and_report_writer_on_cpu(tmp_path):
    """CPU, 1 gloo rank, r_tiny, fp32, tiny: the speed check's code runs (plain loop and ds_face's cell on real
    ranks), then the runner and the report writer; the figures mean nothing for a GPU. Both loops start from the
    same weights on the same batches, so their first losses agree: the baseline trains the same backbone with the
    same head maths."""
    ctx = Context(world_size=1, workdir=tmp_path, classes=100, batch=4, backbones=("r_tiny",), precisions=("fp32",),
                  rates=(0.5,), warmup=1, steps=1)
    outcomes = check.run(ctx, ["nccl", "speed"])  # nccl fails on CPU ranks (gloo, no GPU): reported, not raised
    assert outcomes[0][:2] == ("nccl", "FAILED") and "Traceback" in outcomes[0][3]
    assert outcomes[1][:2] == ("speed", "passed"), outcomes[1][3]
    (backbone, precision, rate, result), = ctx.results["speed"]
    assert result["device"] == "cpu"
    for name in ("plain", "ds_face"):
        assert result[name]["samples_per_s"] > 0 and all(math.isfinite(x) for x in result[name]["losses"])
    assert result["plain"]["losses"][0] == pytest.approx(result["ds_face"]["losses"][0], rel=1e-5)
    assert result["plain"]["losses"][1] == pytest.approx(result["ds_face"]["losses"][1], rel=1e-3)
    assert result["ratio"] == pytest.approx(result["ds_face"]["samples_per_s"] / result["plain"]["samples_per_s"])
    assert result["estimate_mib"] > 0

    text = check.render([("CPU", "test"), ("Memory", "-"), ("GPU", "none (CPU ranks)")], ctx, outcomes, 60.0,
                        "cpu (tests/test_gpu_check.py: the report writer on CPU, not a GPU run)")
    assert text.startswith("# GPU check: cpu (tests/test_gpu_check.py: the report writer on CPU, not a GPU run)")
    assert "2 check(s), 1 failed" in text and "| nccl | NCCL process group on every visible GPU | FAILED |" in text
    assert "| " + " | ".join(SPEED_HEADER) + " |" in text
    row = next(line for line in text.splitlines() if line.startswith("| r_tiny | fp32 | Partial FC 0.5 | 4 x 1 |"))
    assert f"**{result['ratio']:.2f}**" in row and "(cpu on rank 0)" in text
