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
    # AdamW: exp_avg and exp_avg_sq, plus the int64 step count of each row
    assert adam["head_optimizer_state"] == 2 * 500 * row + 500 * 8 and adam["optimizer_state"] == 8000
    # uneven split: the largest shard, ceil(C / W); at least one active row
    assert estimate(cell="Model parallel", **{**TINY, "classes": 1001})["head_weight"] == 501 * row
    assert estimate(cell="Partial FC 0.001", **TINY)["classifier_transients"] == max(6 * 8 * 4 + row, 5 * row)
    # backbone ZeRO stage of these cells
    z3 = estimate(cell="Model parallel", zero_stage=3, **TINY)
    engine_z3 = (z3["parameters"], z3["master_parameters"], z3["gradients"], z3["optimizer_state"])
    assert engine_z3 == (1000, 2000, 1000, 2000)


@pytest.mark.parametrize("storage, dtype", [("device", "float32"), ("device", "bfloat16"), ("host", "float16")])
def test_head_matches_analytic_bytes_of_a_live_head(storage, dtype):
    from ds_face.head import Margin, PartialFC
    for rate in (1.0, 0.1):
        head = PartialFC(8, 1000, rate, Margin.arcface(), rank=0, world_size=2, storage=storage, storage_dtype=dtype)
        live = estimator.analytic_bytes(head, batch=4)
        est = estimate(cell=estimator.pfc_cell(rate), storage=storage, storage_dtype=dtype, **TINY)
        assert live == {"weight": est["head_weight"], "optimizer_state": est["head_optimizer_state"],
                        "transients": est["classifier_transients"]}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_head_tables_are_what_a_live_store_holds(optimizer, tmp_path):
    """The estimator's table bytes against ``HeadStore.nbytes()`` of a real head and optimizer, every storage and
    dtype (disk: real memory-mapped files)."""
    from ds_face.config import HEAD_STORAGE_DTYPES, HEAD_STORAGES
    from ds_face.head import HeadOptimizer, Margin, PartialFC
    assert estimator.STORAGES == HEAD_STORAGES and tuple(estimator.STORAGE_WIDTHS) == HEAD_STORAGE_DTYPES
    for storage in HEAD_STORAGES:
        for dtype in HEAD_STORAGE_DTYPES:
            head = PartialFC(8, 1001, 0.1, Margin.arcface(), rank=0, world_size=2, storage=storage,
                             storage_dtype=dtype, storage_dir=tmp_path / storage)
            HeadOptimizer(head, optimizer)
            tables = estimator.head_tables(head.num_local, 8, optimizer, dtype)
            assert head.store.nbytes() == sum(tables.values()), (storage, dtype)


def test_host_and_disk_storage_move_the_tables_off_the_device():
    row, active = 8 * 4, 50  # 500 rows per rank, 50 used at rate 0.1
    tables = 2 * 500 * row  # fp32 centres + SGD momentum
    # the step's device peak is unchanged: the forward's 6 logit matrices and the rows' copy, 5 R in backward
    step = max(6 * 8 * active * 4 + active * row, 5 * active * row)
    on_device = estimate(cell="Partial FC 0.1", **TINY)
    assert (on_device["head_weight"] + on_device["head_optimizer_state"], on_device["classifier_transients"]) == \
        (tables, step)
    assert estimator.placement(cell="Partial FC 0.1", **TINY) == {"device": total(on_device), "host": 0, "disk": 0}
    staging = active * row  # the fp32 rows one table writes back through the host
    for where in ("host", "disk"):
        off = estimate(cell="Partial FC 0.1", storage=where, **TINY)
        assert off == {**on_device, "head_weight": 0, "head_optimizer_state": 0}
        placed = estimator.placement(cell="Partial FC 0.1", storage=where, **TINY)
        assert placed == {"device": total(on_device) - tables, "host": staging + (tables if where == "host" else 0),
                          "disk": tables if where == "disk" else 0}
    # a 16-bit store: the write-back also holds the rows at the storage width on the host
    assert estimator.placement(cell="Partial FC 0.1", storage="disk", storage_dtype="bfloat16", **TINY)["host"] == \
        staging + staging // 2


def test_16_bit_storage_halves_the_stored_bytes():
    for cell in ("Model parallel", "Partial FC 0.1"):
        for optimizer in ("sgd", "adamw"):
            kw = {**TINY, "optimizer": optimizer}
            full = estimator.placement(cell=cell, storage="disk", **kw)["disk"]
            for dtype in ("bfloat16", "float16"):
                half = estimator.placement(cell=cell, storage="disk", storage_dtype=dtype, **kw)["disk"]
                counter = 500 * 8 if optimizer == "adamw" else 0  # AdamW's int64 step counts keep their width
                assert half - counter == (full - counter) // 2
                dev = estimate(cell=cell, storage_dtype=dtype, **kw)
                assert dev["head_weight"] == 500 * 8 * 2
    # on the device a 16-bit table is read as an fp32 copy even at rate 1.0 (float32 tables are read in place)
    f32, bf16 = (estimate(cell="Model parallel", storage_dtype=d, **TINY)["classifier_transients"]
                 for d in ("float32", "bfloat16"))
    assert (f32, bf16) == (max(6 * 8 * 500 * 4, 3 * 500 * 32), max(6 * 8 * 500 * 4 + 500 * 32, 5 * 500 * 32))


def test_optimizer_step_phase_counts_adamw_rows():
    # micro-batch 1: the logits are small, so the optimizer step is the peak: the summed gradient, the weight,
    # exp_avg, exp_avg_sq rows and two update temporaries (6 R), plus the rows' int64 step counts
    kw = {**TINY, "micro_batch": 1, "optimizer": "adamw", "storage": "host"}
    assert estimate(cell="Partial FC 0.1", **kw)["classifier_transients"] == 6 * 50 * 32 + 50 * 8
    assert estimate(cell="Partial FC 0.1", **{**kw, "optimizer": "sgd"})["classifier_transients"] == 5 * 50 * 32


def test_seed_row_at_float32_device_storage_is_unchanged():
    """29M identities, seed 003's setting, the head on the device in float32: the figure the issue quotes
    (28.7 GB per GPU), term by term."""
    c = estimate(classes=29_000_000, cell="Partial FC 0.1", **SEED)
    assert c == estimate(classes=29_000_000, cell="Partial FC 0.1", storage="device", storage_dtype="float32", **SEED)
    p, rows, n = estimator.backbone_params("r50", 512), 29_000_000 // 8, 8 * 128
    active = rows // 10
    expected = (12 * p  # fp16 params + fp32 master + fp16 grads + fp32 momentum (ZeRO-0)
                + 2 * rows * 512 * 4  # fp32 centres + momentum
                + 6 * n * active * 4 + active * 512 * 4  # the forward's logits and the rows' copy
                + 2 * n * 512 * 4  # all-gathered embeddings and their gradient
                + estimator.activation_elements_per_sample("r50", 512) * 2 * 128 + 400 * MiB)
    assert total(c) == expected
    assert round(total(c) / MiB / 1000, 1) == 28.7  # 28,687 MiB: the "28.7 GB" counts thousands of MiB


def test_100m_row_fits_16gib_only_off_the_device_and_with_a_smaller_micro_batch():
    gib16 = 16 * 2**30
    kw = {k: v for k, v in SEED.items() if k != "micro_batch"}
    fit = estimator.FIT_16GB
    placed = estimator.placement(**fit, **kw)
    assert placed["device"] <= 16e9  # under 16 GB in any reading: 16e9 B < 16,000 MiB < 16 GiB
    rows, active, n = 100_000_000 // 8, 100_000_000 // 80, 8 * fit["micro_batch"]
    # the peak of the step there: 5 [A, D] fp32 in backward (more than the forward's 6 logit matrices + 1)
    assert 5 * active * 512 * 4 > 6 * n * active * 4 + active * 512 * 4
    assert placed["host"] == 2 * rows * 512 * 2 + active * 512 * (4 + 2)  # bf16 tables + write-back staging
    # seed 003's micro-batch 128 at rate 0.1: no storage fits (the fp32 logits alone are 6 x 1024 x 1.25M x 4 B)
    for storage in estimator.STORAGES:
        for dtype in estimator.STORAGE_WIDTHS:
            assert total(estimate(classes=100_000_000, cell="Partial FC 0.1", storage=storage,
                                  storage_dtype=dtype, **SEED)) > gib16
    # with the tables on the device (any dtype) the 100M row does not fit even at the smaller micro-batch
    assert estimator.placement(**{**fit, "storage": "device"}, **kw)["device"] > gib16
    text, published, data = estimator.storage_table()
    assert f"| {fit['classes']:,} | host | bfloat16 | {fit['micro_batch']} x 0.1 | {placed['device'] / MiB:,.0f} |" in text
    assert "32,324 MiB (seed 003)" in text and "32,298 MiB" in published and "79.6 GB" in published
    assert len(data["rows"]) == 2 * 3 * 2 + 2


def test_data_parallel_cells_have_no_head_storage():
    for storage, dtype in (("host", "float32"), ("disk", "float32"), ("device", "bfloat16")):
        with pytest.raises(ValueError, match="head outside ZeRO only"):
            estimate(cell="DP ZeRO-0", storage=storage, storage_dtype=dtype, **TINY)
    with pytest.raises(ValueError, match="storage must be one of"):
        estimate(cell="Partial FC 0.1", storage="nvme", **TINY)
    with pytest.raises(ValueError, match="storage_dtype must be one of"):
        estimate(cell="Partial FC 0.1", storage_dtype="fp16", **TINY)


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
    # the head's storage at 29M and 100M identities beside the seed's and the quoted figures
    assert "| 29,000,000 | device | float32 | 128 x 0.1 |" in out and "| 100,000,000 | disk | bfloat16 |" in out
    assert "32,298 MiB" in out and "79.6 GB" in out


def test_cli_storage_off_the_device(capsys, tmp_path):
    out_json = tmp_path / "m.json"
    code, out = run_cli(capsys, "--backbone", "r_tiny", "--classes", "1000,2000", "--world-size", "2",
                        "--micro-batch", "4", "--storage", "disk", "--storage-dtype", "bfloat16", "--json",
                        str(out_json))
    assert code == 0 and "head storage disk, bfloat16" in out
    header = [c.strip() for c in out.splitlines()[2].strip("|").split("|")]
    assert header == ["classes", "Model parallel", "Partial FC 0.1"]  # no DP cells: their FC is in the engine
    assert "off the device, host / disk" in out
    cell = json.loads(out_json.read_text())["results"]["2000"]["Partial FC 0.1"]
    assert cell["components"]["head_weight"] == 0 and cell["placement"]["disk"] == 2 * 1000 * 512 * 2
    assert cell["placement"]["device"] == cell["total_bytes"]


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
    (["--storage", "nvme"], "invalid choice"),
    (["--storage-dtype", "fp16"], "invalid choice"),
    (["--storage", "host", "--cells", "Partial FC 0.1,DP ZeRO-2"], "head outside ZeRO only"),
    (["--storage-dtype", "bfloat16", "--measure"], "device storage in float32 only"),
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
