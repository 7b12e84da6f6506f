"""The analytic memory estimator (ds_face.bench.estimator) and the memory command (ds_face.bench.memory):
formulas, ordering, CLI and its errors. No ranks."""
import json
import subprocess
import sys

import pytest

from ds_face.bench import estimator, memory
from ds_face.bench.cli import parse_memory
from ds_face.bench.estimator import MiB, estimate, total

# P = 1000 backbone params, C = 1000, D = 8, W = 2, B = 4, 100 B activations per sample, no overhead
TINY = dict(backbone="hand", embedding=8, classes=1000, world_size=2, micro_batch=4, precision="fp16",
            optimizer="sgd", params=1000, activation_bytes_per_sample=100, overhead_bytes=0)


def test_data_parallel_cells_exact():
    p = 1000 + 1000 * 8  # the FC is engine parameters
    # FC step transients: max(6 logit matrices [B, C], the FC's gradient temporaries 3 - 1 (the gradient
    # itself is an engine component) x [C, D]) + the fp32 copy of a 16-bit FC
    transients = max(6 * 4 * 1000 * 4, 2 * 1000 * 8 * 4) + 1000 * 8 * 4
    common = {"head_weight": 0, "head_optimizer_state": 0, "classifier_transients": transients, "embeddings": 0,
              "activations": 400, "overhead": 0}
    fc16 = 2 * 1000 * 8  # the FC in fp16
    assert estimate(cell="DP ZeRO-0", **TINY) == {
        "parameters": 2 * p, "master_parameters": 4 * p, "gradients": 2 * p, "optimizer_state": 4 * p,
        "fc_gathered": 0, "fc_whole_gradient": 0, **common}
    assert estimate(cell="DP ZeRO-1", **TINY) == {
        "parameters": 2 * p, "master_parameters": 2 * p, "gradients": 2 * p, "optimizer_state": 2 * p,
        "fc_gathered": 0, "fc_whole_gradient": 0, **common}
    # the FC's backward makes its whole gradient before ZeRO-2 partitions it: the other half is back
    assert estimate(cell="DP ZeRO-2", **TINY) == {
        "parameters": 2 * p, "master_parameters": 2 * p, "gradients": p, "optimizer_state": 2 * p,
        "fc_gathered": 0, "fc_whole_gradient": fc16 // 2, **common}
    # stage 3 gathers the whole FC for its forward/backward, and copies its whole gradient into a bucket
    assert estimate(cell="DP ZeRO-3", **TINY) == {
        "parameters": p, "master_parameters": 2 * p, "gradients": p, "optimizer_state": 2 * p,
        "fc_gathered": fc16, "fc_whole_gradient": fc16 // 2 + fc16, **common}
    # 12 B/param for fp16 + SGD, 16 for fp16 + Adam, fp32 + SGD: 4 + 4 + 4, no master copy at stage 0
    engine = lambda d: d["parameters"] + d["master_parameters"] + d["gradients"] + d["optimizer_state"]  # noqa: E731
    assert engine(estimate(cell="DP ZeRO-0", **TINY)) == 12 * p
    assert engine(estimate(cell="DP ZeRO-0", **{**TINY, "optimizer": "adamw"})) == 16 * p
    fp32 = estimate(cell="DP ZeRO-0", **{**TINY, "precision": "fp32"})
    assert (fp32["parameters"], fp32["master_parameters"], fp32["gradients"]) == (4 * p, 0, 4 * p)
    assert fp32["classifier_transients"] == transients - 1000 * 8 * 4  # no fp32 copy of an fp32 FC
    # DeepSpeed's ZeRO optimizer keeps an fp32 partition even in fp32
    assert estimate(cell="DP ZeRO-1", **{**TINY, "precision": "fp32"})["master_parameters"] == 2 * p
    assert fp32["activations"] == 400  # an explicit per-sample figure is used as given


def test_head_outside_zero_exact():
    engine = {"parameters": 2000, "master_parameters": 4000, "gradients": 2000, "optimizer_state": 4000}
    row = 8 * 4  # num_local = 500 rows per rank; N = W x B = 8 embeddings per step
    assert estimate(cell="Model parallel", **TINY) == {
        **engine, "fc_gathered": 0, "fc_whole_gradient": 0, "head_weight": 500 * row,
        "head_optimizer_state": 500 * row,
        # max(6 logit matrices [N, 500], 3 x [500, D]: the gradient, the norm path's, the one summed in)
        "classifier_transients": max(6 * 8 * 500 * 4, 3 * 500 * row),
        "embeddings": 2 * 2 * 4 * row, "activations": 400, "overhead": 0}
    assert estimate(cell="Partial FC 0.1", **TINY) == {
        **engine, "fc_gathered": 0, "fc_whole_gradient": 0, "head_weight": 500 * row,
        "head_optimizer_state": 500 * row,
        # 50 sampled rows: + their gathered copy in the forward; 5 x [50, D] in backward and the optimizer step
        "classifier_transients": max(6 * 8 * 50 * 4 + 50 * row, 5 * 50 * row),
        "embeddings": 2 * 2 * 4 * row, "activations": 400, "overhead": 0}
    adam = estimate(cell="Partial FC 0.1", **{**TINY, "optimizer": "adamw"})
    assert adam["head_optimizer_state"] == 2 * 500 * row and adam["optimizer_state"] == 8000
    # uneven split: the largest shard, ceil(C / W); at least one active row
    assert estimate(cell="Model parallel", **{**TINY, "classes": 1001})["head_weight"] == 501 * row
    assert estimate(cell="Partial FC 0.001", **TINY)["classifier_transients"] == max(6 * 8 * 4 + row, 5 * row)
    # backbone ZeRO stage of these cells
    z3 = estimate(cell="Model parallel", zero_stage=3, **TINY)
    engine_z3 = (z3["parameters"], z3["master_parameters"], z3["gradients"], z3["optimizer_state"])
    assert engine_z3 == (1000, 2000, 1000, 2000)


def test_head_matches_analytic_bytes_of_a_live_head():
    from ds_face.head import Margin, PartialFC
    for rate in (1.0, 0.1):
        head = PartialFC(8, 1000, rate, Margin.arcface(), rank=0, world_size=2)
        live = estimator.analytic_bytes(head, batch=4)
        est = estimate(cell=estimator.pfc_cell(rate), **TINY)
        assert live == {"weight": est["head_weight"], "optimizer_state": est["head_optimizer_state"],
                        "transients": est["classifier_transients"]}


def test_backbone_figures_from_meta_device():
    from ds_face.backbones import get_backbone
    assert estimator.backbone_params("r_tiny", 512) == sum(p.numel() for p in get_backbone("r_tiny", 512).parameters())
    assert estimator.backbone_params("r50", 512) == 43_590_848
    # input + 112x112x64 stem (conv, bn, prelu) at least
    assert estimator.activation_elements_per_sample("r50", 512) > 3 * 112 * 112 + 3 * 112 * 112 * 64
    assert estimator.activation_elements_per_sample("r18", 512) < estimator.activation_elements_per_sample("r50", 512)


SEED = dict(backbone="r50", embedding=512, world_size=8, micro_batch=128, precision="fp16", optimizer="sgd")


@pytest.mark.parametrize("classes", [1_400_000, 5_500_000, 29_000_000])
def test_partial_fc_below_model_parallel_below_data_parallel(classes):
    t = {cell: total(estimate(classes=classes, cell=cell, **SEED))
         for cell in ("DP ZeRO-0", "Model parallel", "Partial FC 0.1", "Partial FC 0.2")}
    assert t["Partial FC 0.1"] < t["Partial FC 0.2"] < t["Model parallel"] < t["DP ZeRO-0"]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_zero_stages_non_increasing(precision, optimizer):
    kw = {**SEED, "precision": precision, "optimizer": optimizer}
    for classes in (1000, 125_000, 29_000_000):
        cells = [estimate(classes=classes, cell=f"DP ZeRO-{s}", **kw) for s in range(4)]
        totals = [total(c) for c in cells]
        assert totals[:3] == sorted(totals[:3], reverse=True), totals
        # stage 3 partitions the states further but gathers the whole FC (one parameter) to use it
        assert totals[3] - cells[3]["fc_gathered"] - cells[3]["fc_whole_gradient"] < totals[2], totals
        heads = [total(estimate(classes=classes, cell="Partial FC 0.1", zero_stage=s, **kw)) for s in range(4)]
        assert heads == sorted(heads, reverse=True), heads


def test_parse_memory_binary_units():
    gib = 2**30
    assert parse_memory("32GB") == parse_memory("32G") == parse_memory("32GiB") == parse_memory("32768MB") == 32 * gib
    assert parse_memory("24GiB") == 24 * gib
    assert parse_memory("32000MB") == 32000 * MiB
    assert parse_memory("32510") == 32510 * MiB  # bare number: MB
    assert parse_memory("1.5gb") == int(1.5 * gib)
    for bad in ("32XB", "-1GB", "0GB", "", "GB", "3 2GB"):
        with pytest.raises(ValueError):
            parse_memory(bad)


def run_cli(capsys, *argv):
    code = memory.main(list(argv))
    return code, capsys.readouterr().out


def test_cli_table_and_budget_marking(capsys, tmp_path):
    out_json = tmp_path / "m.json"
    code, out = run_cli(capsys, "--backbone", "r50", "--classes", "125000,29000000", "--world-size", "8",
                        "--micro-batch", "128", "--device-memory", "32GB", "--sample-rates", "0.1,0.2",
                        "--breakdown", "--json", str(out_json))
    assert code == 0
    lines = [ln for ln in out.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["classes", "DP ZeRO-0", "DP ZeRO-1", "DP ZeRO-2", "DP ZeRO-3", "Model parallel",
                      "Partial FC 0.1", "Partial FC 0.2"]
    small = [c.strip() for c in lines[2].strip("|").split("|")]
    large = [c.strip() for c in lines[3].strip("|").split("|")]
    assert small[0] == "125,000" and "-" not in small  # everything fits at 125K
    assert large[0] == "29,000,000" and large[1:6] == ["-"] * 5 and large[6] != "-"  # only Partial FC 0.1 fits
    assert "Breakdown" in out and "head_optimizer_state" in out
    data = json.loads(out_json.read_text())
    cell = data["results"]["29000000"]["DP ZeRO-0"]
    assert cell["fits"] is False and cell["total_bytes"] > 32 * 2**30
    assert sum(cell["components"].values()) == cell["total_bytes"]
    pfc = data["results"]["29000000"]["Partial FC 0.1"]
    assert pfc["fits"] is True and round(pfc["total_bytes"] / MiB) == int(large[6].replace(",", ""))


def test_cli_without_budget_has_no_dashes_and_compare_seed(capsys):
    code, out = run_cli(capsys, "--backbone", "r_tiny", "--classes", "1000", "--world-size", "2",
                        "--micro-batch", "4", "--compare-seed", "--overhead-mb", "0")
    assert code == 0
    rows = [ln for ln in out.splitlines() if ln.startswith("| 1,000 |")]
    assert rows and " - " not in rows[0]
    assert "| 29,000,000 | - |" in out and "32,324" in out  # the seed's published figure is quoted
    assert "Where they differ" in out


@pytest.mark.parametrize("argv, message", [
    (["--backbone", "r51"], "unknown backbone"),
    (["--world-size", "0"], "--world-size must be a positive integer"),
    (["--micro-batch", "-3"], "--micro-batch must be a positive integer"),
    (["--classes", "1e5,abc"], "positive integers"),
    (["--classes", "0"], "positive integers"),
    (["--classes", ""], "positive integers"),
    (["--classes", "100,,200"], "positive integers"),
    (["--device-memory", "32XB"], "cannot parse memory size"),
    (["--device-memory=-1GB"], "must be positive"),
    (["--sample-rates", "0"], "(0, 1]"),
    (["--sample-rates", "1.5"], "(0, 1]"),
    (["--sample-rates=-0.1"], "(0, 1]"),
    (["--sample-rates", "abc"], "sample rates"),
    (["--precision", "fp8"], "invalid choice"),
])
def test_cli_bad_input_exits_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        memory.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and message in err, err


def test_estimate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown backbone"):
        estimate(**{**TINY, "params": None, "backbone": "r51"}, cell="Model parallel")
    with pytest.raises(ValueError, match="world_size"):
        estimate(**{**TINY, "world_size": 0}, cell="Model parallel")
    with pytest.raises(ValueError, match="unknown cell"):
        estimate(**TINY, cell="Partial FC 1.5")
    with pytest.raises(ValueError, match="precision"):
        estimate(**{**TINY, "precision": "fp8"}, cell="DP ZeRO-0")


def test_module_entry_point():
    ok = subprocess.run([sys.executable, "-m", "ds_face.bench", "memory", "--backbone", "r_tiny", "--classes",
                         "1000", "--world-size", "2"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "| 1,000 |" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "ds_face.bench", "latency"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "error: unknown command 'latency'" in bad.stderr


def test_plot_writes_a_png(capsys, tmp_path):
    png = tmp_path / "m.png"
    code, _ = run_cli(capsys, "--backbone", "r_tiny", "--classes", "1000,100000", "--world-size", "2",
                      "--device-memory", "1GB", "--plot", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_redrawn_from_the_json_is_the_same_picture(capsys, tmp_path):
    png, results, again = tmp_path / "m.png", tmp_path / "m.json", tmp_path / "again.png"
    code, _ = run_cli(capsys, "--backbone", "r_tiny", "--classes", "1000,100000,10000000", "--world-size", "2",
                      "--device-memory", "1GB", "--plot", str(png), "--json", str(results))
    assert code == 0
    from ds_face.bench.plots import replot
    replot(str(results), str(again))
    assert again.read_bytes() == png.read_bytes()


def test_cells_with_the_same_figures_are_named_as_such():
    from ds_face.bench.plots import _same_as
    series = {"DP ZeRO-0": [100.0, 200.0], "DP ZeRO-1": [100.0, 200.0], "DP ZeRO-2": [99.5, 199.0],
              "DP ZeRO-3": [130.0, 260.0], "Partial FC 0.1": [10.0, 20.0]}
    assert _same_as(series) == {"DP ZeRO-1": "DP ZeRO-0", "DP ZeRO-2": "DP ZeRO-0"}
