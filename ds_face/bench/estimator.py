"""The memory estimator: bytes per device of each cell (the FC inside ZeRO, model parallel, Partial FC),
from formulas alone: nothing is allocated (backbone figures come from the meta device). For the head outside
ZeRO, also where its tables live (``head.storage`` device / host / disk, ``head.storage_dtype``): ``placement``
gives a cell's bytes per rank on the device, in host memory and on local disk.

The formulas, what they count and what they leave out are stated in BENCHMARKS.md ("Estimator");
``--measure`` (``ds_face.bench.cells``) checks them against real steps.
"""
from __future__ import annotations

import functools
import math
import re

from ds_face.runtime.markdown import markdown_table

MiB = 2**20
PRECISIONS = {"fp32": 4, "fp16": 2, "bf16": 2}  # bytes per parameter / activation element
OPTIMIZERS = {"sgd": 1, "adam": 2, "adamw": 2}  # fp32 states per parameter
IMAGE = (3, 112, 112)
# Where the head's tables live and at which width (head.storage, head.storage_dtype: ds_face.head.storage).
STORAGES = ("device", "host", "disk")
STORAGE_WIDTHS = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per stored value; computed on in fp32
STEP_COUNTER = 8  # AdamW's int64 step count per row (ds_face.head.optim), whatever the storage dtype
UPDATE_TEMPORARIES = {"sgd": 0, "adam": 2, "adamw": 2}  # [A, D] fp32 temporaries of the head's update


# -- cells ---------------------------------------------------------------------------------------
def dp_cell(stage: int) -> str:
    return f"DP ZeRO-{stage}"


def pfc_cell(rate: float) -> str:
    return "Model parallel" if rate >= 1.0 else f"Partial FC {rate:g}"


def parse_cell(cell: str) -> tuple[str, float]:
    """'DP ZeRO-2' -> ('dp', 2); 'Model parallel' -> ('head', 1.0); 'Partial FC 0.1' -> ('head', 0.1)."""
    if m := re.fullmatch(r"DP ZeRO-([0-3])", cell):
        return "dp", int(m.group(1))
    if cell == "Model parallel":
        return "head", 1.0
    if m := re.fullmatch(r"Partial FC ([0-9.eE+-]+)", cell):
        rate = float(m.group(1))
        if 0.0 < rate <= 1.0:
            return "head", rate
    raise ValueError(f"unknown cell {cell!r}: 'DP ZeRO-0'..'DP ZeRO-3', 'Model parallel' or 'Partial FC <rate>'")


# -- backbone figures (meta device: nothing is allocated) ----------------------------------------
def _meta_backbone(name: str, embedding: int):
    import torch

    from ds_face.backbones import get_backbone
    with torch.device("meta"):
        return get_backbone(name, embedding)


@functools.lru_cache(maxsize=None)
def backbone_params(name: str, embedding: int = 512) -> int:
    return sum(p.numel() for p in _meta_backbone(name, embedding).parameters())


@functools.lru_cache(maxsize=None)
def activation_elements_per_sample(name: str, embedding: int = 512) -> int:
    """Input numel + output numel of every leaf module, one 112x112 sample, meta-device forward."""
    import torch
    model = _meta_backbone(name, embedding).eval()  # eval: batch 1 through BatchNorm1d; same shapes
    total = [math.prod(IMAGE)]
    hooks = [m.register_forward_hook(lambda _m, _i, out: total.__setitem__(0, total[0] + out.numel()))
             for m in model.modules() if next(m.children(), None) is None]
    try:
        with torch.no_grad():
            model(torch.empty(1, *IMAGE, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return total[0]


# -- the estimator -------------------------------------------------------------------------------
def _engine_bytes(params: int, world: int, precision: str, optimizer: str, stage: int) -> dict:
    width = PRECISIONS[precision]
    div = lambda n, from_stage: n / world if stage >= from_stage else n  # noqa: E731
    # DeepSpeed's ZeRO optimizer (stage >= 1) keeps an fp32 copy of each rank's partition whatever the
    # precision (a clone even in fp32); at stage 0 only the 16-bit optimizers keep fp32 master weights.
    master = 4 * params if (width < 4 or stage >= 1) else 0
    return {"parameters": div(width * params, 3),
            "master_parameters": div(master, 1),
            "gradients": div(width * params, 2),
            "optimizer_state": div(4 * OPTIMIZERS[optimizer] * params, 1)}


def classifier_transients(rows_in_step: int, embedding: int, samples: int, *, rows_gathered: bool,
                          gradient_counted: bool) -> int:
    """Bytes the cosine classifier's step holds at its peak beyond the persistent tensors (fp32).

    With L = samples x rows (one fp32 logit matrix) and R = rows x embedding x 4 (one fp32 [rows, D]):
    the forward keeps up to 6 L alive at once (the product, its column-scaled cosine, the clamp, the
    margin's copy and its scaled copy, exp), plus R for a gathered copy of sampled rows; backward and the
    optimizer step hold up to 3 R at rate 1.0 (the gradient, the norm path's temporary, the one being
    summed in) and 5 R for sampled rows (also the optimizer's gathered weight and state rows). Measured on
    CPU for ``ds_face.head`` (``--measure`` checks it). ``gradient_counted``: the FC's gradient is already
    an engine component (data-parallel cells), so one R less.
    """
    logit, row = samples * rows_in_step * 4, rows_in_step * embedding * 4
    forward = 6 * logit + (row if rows_gathered else 0)
    backward = (5 if rows_gathered else 3) * row - (row if gradient_counted else 0)
    return max(forward, backward)


def head_tables(rows: int, embedding: int, optimizer: str, storage_dtype: str = "float32") -> dict:
    """Bytes of one rank's stored head tables (``HeadStore``) of ``rows`` rows: the centres and the optimizer's
    [rows, D] state (SGD: momentum; AdamW: exp_avg and exp_avg_sq) at the storage dtype's width, plus AdamW's
    int64 step count per row."""
    width = STORAGE_WIDTHS[storage_dtype]
    counter = 0 if optimizer == "sgd" else STEP_COUNTER
    return {"head_weight": rows * embedding * width,
            "head_optimizer_state": rows * (embedding * width * OPTIMIZERS[optimizer] + counter)}


def optimizer_step_transients(rows_in_step: int, embedding: int, optimizer: str, *, rows_copied: bool) -> int:
    """fp32 bytes the head's optimizer step holds on the device (backward has freed the logits by then).

    With R = rows x embedding x 4: the summed gradient R, the update's temporaries (AdamW: its denominator and
    exp_avg / bias1, 2 R; SGD updates in place) and, where the store's rows are read as copies, the weight and
    state rows read (1 + 1 R for SGD, 1 + 2 R and the int64 step counts for AdamW). Rows are copies unless the
    store's float32 tables on the device are read whole (rate 1.0): then the update is in place.
    """
    row = rows_in_step * embedding * 4
    held = 1 + UPDATE_TEMPORARIES[optimizer]
    if not rows_copied:
        return held * row
    counter = 0 if optimizer == "sgd" else STEP_COUNTER * rows_in_step
    return (held + 1 + OPTIMIZERS[optimizer]) * row + counter


def host_staging(rows_in_step: int, embedding: int, storage_dtype: str) -> int:
    """Host bytes a host- or disk-stored head's step holds beside the tables: the write-back of one table's rows
    (a blocking device-to-host copy converts on the host: the fp32 rows, then their storage-width copy that
    ``index_copy_`` takes). A read's ``index_select`` (storage width) is smaller."""
    row = rows_in_step * embedding
    width = STORAGE_WIDTHS[storage_dtype]
    return row * 4 + (row * width if width < 4 else 0)


def _head(embedding: int, classes: int, world_size: int, micro_batch: int, optimizer: str, rate: float,
          storage: str, storage_dtype: str) -> tuple[dict, dict]:
    """The head-outside-ZeRO cell's head: (its device components, its bytes on the host and on disk)."""
    num_local = -(-classes // world_size)  # the largest shard
    active = num_local if rate >= 1.0 else max(int(rate * num_local), 1)
    tables = head_tables(num_local, embedding, optimizer, storage_dtype)
    # Rows read from the store are fp32 copies, except float32 tables on the device read whole (rate 1.0).
    copied = rate < 1.0 or storage != "device" or storage_dtype != "float32"
    # The peak is the larger of two phases that never overlap: the micro-step (forward logits, backward) and
    # the optimizer step, which starts after backward has freed the logits.
    step = max(classifier_transients(active, embedding, world_size * micro_batch, rows_gathered=copied,
                                     gradient_counted=False),
               optimizer_step_transients(active, embedding, optimizer, rows_copied=copied))
    on_device = storage == "device"
    device = {"fc_gathered": 0, "fc_whole_gradient": 0, **(tables if on_device else dict.fromkeys(tables, 0)),
              "classifier_transients": step,
              "embeddings": 2 * world_size * micro_batch * embedding * 4}  # all-gathered, and their gradient
    stored = 0 if on_device else sum(tables.values())
    staging = 0 if on_device else host_staging(active, embedding, storage_dtype)
    return device, {"host": staging + (stored if storage == "host" else 0), "disk": stored if storage == "disk" else 0}


def estimate(backbone: str, embedding: int, classes: int, world_size: int, micro_batch: int,
             precision: str, optimizer: str, cell: str, *, zero_stage: int = 0,
             params: int | None = None, activation_bytes_per_sample: float | None = None,
             overhead_bytes: float = 400 * MiB, storage: str = "device", storage_dtype: str = "float32") -> dict:
    """Estimated bytes per device, by component, for one cell (the formulas: BENCHMARKS.md, "Estimator").

    ``params`` / ``activation_bytes_per_sample`` override the backbone's figures (then ``backbone``
    is only a label); ``zero_stage`` is the backbone's stage in the head-outside-ZeRO cells.

    ``storage`` / ``storage_dtype`` (head-outside-ZeRO cells only: ``head.storage``, ``head.storage_dtype``):
    with ``device`` the head's tables (``head_tables``) are device components at the storage dtype's width.
    With ``host`` or ``disk`` they leave the device (``placement`` says where they go) and the device holds only
    the fp32 rows a step uses: ``classifier_transients`` is then the larger of two phases that never overlap,
    the micro-step (6 logit matrices + the rows' fp32 copy in the forward; 5 [A, D] in backward, as for sampled
    rows on the device) and the optimizer step after backward freed the logits (``optimizer_step_transients``:
    gradient + weight + state rows + the update's temporaries). A 16-bit dtype on the device also makes every
    read a copy, at rate 1.0 too. Half-width staging copies of a 16-bit store's rows (a read's
    ``index_select``, a write's cast) live below either peak and are not counted; nor is gradient accumulation
    (each micro-step's leaf rows and gradients are kept until the optimizer step, which uses their union).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {', '.join(STORAGES)}, got {storage!r}")
    if storage_dtype not in STORAGE_WIDTHS:
        raise ValueError(f"storage_dtype must be one of {', '.join(STORAGE_WIDTHS)}, got {storage_dtype!r}")
    for label, value in (("embedding", embedding), ("classes", classes), ("world_size", world_size),
                         ("micro_batch", micro_batch)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage!r}")
    kind, arg = parse_cell(cell)
    if kind == "dp" and (storage, storage_dtype) != ("device", "float32"):
        raise ValueError(f"{cell}: the FC inside ZeRO is an engine parameter; storage {storage!r} / "
                         f"storage_dtype {storage_dtype!r} apply to the head outside ZeRO only")
    if params is None:
        params = backbone_params(backbone, embedding)
    if activation_bytes_per_sample is None:
        activation_bytes_per_sample = activation_elements_per_sample(backbone, embedding) * PRECISIONS[precision]
    width = PRECISIONS[precision]
    fc = classes * embedding
    out = {}
    if kind == "dp":
        out.update(_engine_bytes(params + fc, world_size, precision, optimizer, arg))
        # stage 3 gathers the whole FC for its forward and backward; at stage >= 2 its backward still makes the
        # FC's gradient whole before ZeRO reduces and partitions it (one parameter, one gradient tensor), and
        # stage 3 copies it into its reduce bucket
        out["fc_gathered"] = width * fc if arg == 3 else 0
        out["fc_whole_gradient"] = (width * fc * (1 - 1 / world_size) if arg >= 2 else 0) + (width * fc if arg == 3 else 0)
        out.update(head_weight=0, head_optimizer_state=0)
        # the logits run in fp32: a 16-bit FC is cast to an fp32 copy (kept for backward)
        out["classifier_transients"] = (classifier_transients(classes, embedding, micro_batch, rows_gathered=False,
                                                              gradient_counted=True) + (4 * fc if width < 4 else 0))
        out["embeddings"] = 0
    else:
        out.update(_engine_bytes(params, world_size, precision, optimizer, zero_stage))
        out.update(_head(embedding, classes, world_size, micro_batch, optimizer, arg, storage, storage_dtype)[0])
    out["activations"] = activation_bytes_per_sample * micro_batch
    out["overhead"] = overhead_bytes
    return {k: int(round(v)) for k, v in out.items()}


def total(components: dict) -> int:
    return sum(components.values())


def placement(backbone: str, embedding: int, classes: int, world_size: int, micro_batch: int, precision: str,
              optimizer: str, cell: str, *, storage: str = "device", storage_dtype: str = "float32", **kw) -> dict:
    """Bytes per rank by where they live: ``{"device": estimate's total, "host": ..., "disk": ...}`` (the
    arguments are ``estimate``'s).

    Host and disk count the head alone: with ``host`` storage its tables (``head_tables``, pinned host memory)
    and the step's write-back staging (``host_staging``); with ``disk`` the tables are memory-mapped files on
    local disk and the host holds the staging only (the kernel's page cache keeps recently used pages of the
    files: reclaimable, not counted). Not counted on the host: the backbone, the data loader, DeepSpeed.
    """
    device = total(estimate(backbone, embedding, classes, world_size, micro_batch, precision, optimizer, cell,
                            storage=storage, storage_dtype=storage_dtype, **kw))
    kind, rate = parse_cell(cell)
    if kind == "dp":
        return {"device": device, "host": 0, "disk": 0}
    off = _head(embedding, classes, world_size, micro_batch, optimizer, rate, storage, storage_dtype)[1]
    return {"device": device, **off}


def analytic_bytes(head, batch: int) -> dict:
    """Bytes per rank a live PartialFC head holds on its device at its peak, for SGD: the same formulas as
    ``estimate``'s head components, for the head's own storage and dtype (used by bench.head)."""
    store = head.store
    device, _ = _head(head.embedding_size, head.num_local * head.world_size, head.world_size, batch, "sgd",
                      head.sample_rate, store.storage, store.dtype_name)
    return {"weight": device["head_weight"], "optimizer_state": device["head_optimizer_state"],
            "transients": device["classifier_transients"]}


def table(classes: list[int], cells: list[str], device_bytes: int | None = None, **kw) -> tuple[str, dict]:
    """Markdown table of MiB per device ('-' above ``device_bytes``) and the per-cell breakdowns."""
    results, rows = {}, []
    for c in classes:
        results[c], row = {}, [f"{c:,}"]
        for cell in cells:
            comp = estimate(classes=c, cell=cell, **kw)
            t = total(comp)
            fits = device_bytes is None or t <= device_bytes
            results[c][cell] = {"total_bytes": t, "fits": fits, "components": comp,
                                "placement": placement(classes=c, cell=cell, **kw)}
            row.append(f"{t / MiB:,.0f}" if fits else "-")
        rows.append(row)
    return markdown_table(["classes"] + cells, rows), results


def off_device_table(results: dict) -> str:
    """Markdown table of the head's MiB per rank off the device, 'host / disk', from ``table``'s results."""
    cells = list(next(iter(results.values())))
    rows = [[f"{c:,}"] + [" / ".join(f"{r['placement'][k] / MiB:,.0f}" for k in ("host", "disk"))
                          for r in per_cell.values()] for c, per_cell in results.items()]
    return markdown_table(["classes"] + cells, rows)


def breakdown_table(results: dict) -> str:
    rows = []
    for c, per_cell in results.items():
        for cell, r in per_cell.items():
            rows.append([f"{c:,}", cell] + [f"{v / MiB:,.0f}" for v in r["components"].values()]
                        + [f"{r['total_bytes'] / MiB:,.0f}"])
    keys = list(next(iter(next(iter(results.values())).values()))["components"])
    return markdown_table(["classes", "cell"] + keys + ["total"], rows)


# -- the seed's table ----------------------------------------------------------------------------
# seeds/003_f74bb899f16e7369.txt, "2. GPU memory cost of different parallel methods (GB per GPU),
# Tesla V100 32GB * 8": figures as published (gpustat MiB despite the "GB" header); None = '-'
# (did not fit). Columns: Data Parallel, Model Parallel, Partial FC 0.1. r50, fp16, batch 128/GPU.
SEED_V100_MIB = {
    125_000: (7358, 5306, 4868),
    250_000: (9940, 5826, 5004),
    500_000: (14220, 7114, 5202),
    1_000_000: (23708, 9966, 5620),
    1_400_000: (32252, 11178, 6056),
    2_000_000: (None, 13978, 6472),
    4_000_000: (None, 23238, 8284),
    5_500_000: (None, 32188, 9854),
    8_000_000: (None, None, 12310),
    16_000_000: (None, None, 19950),
    29_000_000: (None, None, 32324),
}
SEED_SETTING = dict(backbone="r50", embedding=512, world_size=8, micro_batch=128, precision="fp16",
                    optimizer="sgd", device_mib=32510)
SEED_NOTE = """\
Where they differ: at 125K classes, where activations (34.5 MiB/sample x 128, a leaf-module count, not
measured on a GPU) and the 400 MiB overhead dominate, the estimator is 8% under the seed for data parallel,
8% over for model parallel and 11% over for Partial FC 0.1. It grows more slowly with the class count than the
seed: per extra class the seed grows by ~20.5 KB (DP), ~5.2 KB (MP) and ~1.0 KB (PFC 0.1) per GPU against
12.3, 3.6 and 0.84 KB here (KB = 1000 B), so at 1M classes the estimator is 72% (DP), 88% (MP) and 109%
(PFC 0.1) of the seed and at the largest class count each column reached, 67% (DP, 1.4M), 75% (MP, 5.5M) and
89% (PFC 0.1, 29M). The '-' pattern is the seed's but for one cell: data parallel at 2M fits here (28,756 MiB).
The classifier's temporaries are counted for ds_face's code (measured on CPU, --measure); the seed's
arcface_torch with amp normalises a copy of the weight (an [A, D] tensor kept for backward and several
more in its backward, where ds_face divides the logits by the norms), keeps fp16 and fp32 logits and a
one-hot matrix, and its data-parallel FC is an fp32 Parameter under DDP with gradient bucket copies; the
caching allocator also keeps freed blocks reserved, which gpustat counts and --measure on a GPU (peak
allocated) does not."""


def seed_comparison(overhead_bytes: float = 400 * MiB,
                    activation_bytes_per_sample: float | None = None) -> tuple[str, dict]:
    """The estimator at the seed's setting beside seeds/003 table 2 (MiB per GPU)."""
    s = SEED_SETTING
    kw = dict(backbone=s["backbone"], embedding=s["embedding"], world_size=s["world_size"],
              micro_batch=s["micro_batch"], precision=s["precision"], optimizer=s["optimizer"],
              overhead_bytes=overhead_bytes, activation_bytes_per_sample=activation_bytes_per_sample)
    fmt = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
    rows, data = [], {}
    for c, seed in SEED_V100_MIB.items():
        est = [total(estimate(classes=c, cell=cell, **kw)) / MiB
               for cell in (dp_cell(0), "Model parallel", "Partial FC 0.1")]
        data[c] = {"seed_mib": seed, "estimate_mib": est}
        shown = [fmt(e) if e <= s["device_mib"] else f"({e:,.0f})" for e in est]
        rows.append([f"{c:,}"] + [x for pair in zip(map(fmt, seed), shown) for x in pair])
    header = ["classes", "DP seed", "DP ZeRO-0 est.", "MP seed", "MP est.", "PFC 0.1 seed", "PFC 0.1 est."]
    return markdown_table(header, rows), data


# -- where the head lives, at 29M and 100M identities --------------------------------------------
STORAGE_CLASSES = (29_000_000, 100_000_000)
# The 100M row that fits 16 GB per GPU (r50, 8 GPUs, fp16, SGD): at Partial FC 0.1 only with a smaller
# micro-batch than the seed's 128 (the largest that fits 16 GiB is 49, under 1% headroom; 32 leaves 13%) and the
# head's tables off the device; at micro-batch 128 the rate must drop to 0.034 or below. AdamW's step needs more.
FIT_16GB = dict(classes=100_000_000, micro_batch=32, cell="Partial FC 0.1", storage="host", storage_dtype="bfloat16")
# Published MiB per GPU, quoted (REFERENCE.md and issue 26), with the setting that the estimator can be put at
# where the source gives it (None: the micro-batch is not quoted).
PUBLISHED = (
    ("seed 003: arcface_torch Partial FC 0.1, 8x V100-32GB, r50, fp16, batch 128/GPU, gpustat", 29_000_000,
     "32,324 MiB", dict(micro_batch=128, storage="device", storage_dtype="float32")),
    ("PLSC v2.2: 8x V100-32GB, r50, batch 64/GPU, rate 0.1, weights + momentum in fp16, sparse momentum",
     92_000_000, "32,298 MiB", dict(micro_batch=64, storage="device", storage_dtype="float16")),
    ("arcface_torch: 8x A100-80GB, r50, rate 0.1", 80_000_000, "79.6 GB", None),
)


def storage_table(overhead_bytes: float = 400 * MiB,
                  activation_bytes_per_sample: float | None = None) -> tuple[str, str, dict]:
    """Bytes per rank on device / host / disk for 29M and 100M identities at the seed's setting (r50, 8 ranks,
    fp16, SGD, Partial FC 0.1, micro-batch 128), every storage x float32 / bfloat16, plus the ``FIT_16GB`` row;
    then the published figures (quoted) beside the estimator at their settings. Returns (table, published
    table, data)."""
    s = SEED_SETTING
    kw = dict(backbone=s["backbone"], embedding=s["embedding"], world_size=s["world_size"],
              precision=s["precision"], optimizer=s["optimizer"], overhead_bytes=overhead_bytes,
              activation_bytes_per_sample=activation_bytes_per_sample)
    settings = [dict(classes=c, micro_batch=s["micro_batch"], cell="Partial FC 0.1", storage=where, storage_dtype=dt)
                for c in STORAGE_CLASSES for where in STORAGES for dt in ("float32", "bfloat16")]
    settings += [FIT_16GB, {**FIT_16GB, "storage": "disk"}]
    rows, data = [], []
    for setting in settings:
        placed = placement(**setting, **kw)
        data.append({**setting, **placed})
        quoted = [f"{figure} ({source.split(':')[0]})" for source, classes, figure, at in PUBLISHED
                  if at and setting == dict(classes=classes, cell="Partial FC 0.1", **at)]
        rows.append([f"{setting['classes']:,}", setting["storage"], setting["storage_dtype"],
                     f"{setting['micro_batch']} x {parse_cell(setting['cell'])[1]:g}"]
                    + [f"{placed[k] / MiB:,.0f}" for k in ("device", "host", "disk")] + ["".join(quoted)])
    text = markdown_table(["identities", "head.storage", "head.storage_dtype", "micro-batch x rate", "device MiB",
                           "host MiB", "disk MiB", "published per GPU"], rows, "lllrrrrl")
    published_rows, published = [], []
    for source, classes, figure, setting in PUBLISHED:
        est = None if setting is None else placement(classes=classes, cell="Partial FC 0.1", **setting, **kw)
        published.append({"source": source, "classes": classes, "published": figure, "estimate": est})
        published_rows.append([source, f"{classes:,}", figure,
                               "-" if est is None else f"{est['device'] / MiB:,.0f} MiB ({setting['storage']}, "
                                                       f"{setting['storage_dtype']})"])
    published_text = markdown_table(["published (quoted)", "identities", "per GPU", "estimator, device"],
                                    published_rows)
    return text, published_text, {"rows": data, "published": published}
