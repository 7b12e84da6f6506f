"""The memory estimator: bytes per device of each cell (the FC inside ZeRO, model parallel, Partial FC),
from formulas alone: nothing is allocated (backbone figures come from the meta device).

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


def estimate(backbone: str, embedding: int, classes: int, world_size: int, micro_batch: int,
             precision: str, optimizer: str, cell: str, *, zero_stage: int = 0,
             params: int | None = None, activation_bytes_per_sample: float | None = None,
             overhead_bytes: float = 400 * MiB) -> dict:
    """Estimated bytes per device, by component, for one cell (the formulas: BENCHMARKS.md, "Estimator").

    ``params`` / ``activation_bytes_per_sample`` override the backbone's figures (then ``backbone``
    is only a label); ``zero_stage`` is the backbone's stage in the head-outside-ZeRO cells.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    for label, value in (("embedding", embedding), ("classes", classes), ("world_size", world_size),
                         ("micro_batch", micro_batch)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage!r}")
    kind, arg = parse_cell(cell)
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
        num_local = -(-classes // world_size)
        active = num_local if arg >= 1.0 else max(int(arg * num_local), 1)
        row = embedding * 4
        out.update(fc_gathered=0, fc_whole_gradient=0, head_weight=num_local * row,
                   head_optimizer_state=num_local * row * OPTIMIZERS[optimizer],
                   classifier_transients=classifier_transients(active, embedding, world_size * micro_batch,
                                                               rows_gathered=arg < 1.0, gradient_counted=False),
                   embeddings=2 * world_size * micro_batch * row)  # all-gathered, and their gradient
    out["activations"] = activation_bytes_per_sample * micro_batch
    out["overhead"] = overhead_bytes
    return {k: int(round(v)) for k, v in out.items()}


def total(components: dict) -> int:
    return sum(components.values())


def analytic_bytes(head, batch: int) -> dict:
    """fp32 bytes per rank a live PartialFC head holds at its peak: the same formulas as ``estimate``'s head
    components, for SGD (used by bench.head)."""
    rows = head.num_local if head.sample_rate >= 1.0 else head.num_sample  # active centres per step
    return {"weight": head.num_local * head.embedding_size * 4,
            "optimizer_state": head.num_local * head.embedding_size * 4,  # SGD momentum, the whole slice
            "transients": classifier_transients(rows, head.embedding_size, head.world_size * batch,
                                                rows_gathered=head.sample_rate < 1.0, gradient_counted=False)}


def table(classes: list[int], cells: list[str], device_bytes: int | None = None, **kw) -> tuple[str, dict]:
    """Markdown table of MiB per device ('-' above ``device_bytes``) and the per-cell breakdowns."""
    results, rows = {}, []
    for c in classes:
        results[c], row = {}, [f"{c:,}"]
        for cell in cells:
            comp = estimate(classes=c, cell=cell, **kw)
            t = total(comp)
            fits = device_bytes is None or t <= device_bytes
            results[c][cell] = {"total_bytes": t, "fits": fits, "components": comp}
            row.append(f"{t / MiB:,.0f}" if fits else "-")
        rows.append(row)
    return markdown_table(["classes"] + cells, rows), results


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
