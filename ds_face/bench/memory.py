"""Memory per device, estimated (and measured with --measure): the classification layer inside ZeRO vs outside.

    python -m ds_face.bench memory --backbone r50 --classes 125000,1400000,5500000,29000000 \\
        --world-size 8 --micro-batch 128 --precision fp16 --device-memory 32GB [--sample-rates 0.1,0.2] \\
        [--optimizer sgd] [--zero-stage 0] [--breakdown] [--json out.json] [--plot out.png] [--compare-seed] \\
        [--measure [--steps 3 --warmup 1]] [--cells 'DP ZeRO-0,Model parallel,Partial FC 0.1']

Without ``--measure`` nothing is allocated: the figures are formulas (below) evaluated on the meta
device. Rows are class counts C; columns are cells; each cell is the estimated MiB per device, '-' where it exceeds
``--device-memory``. All sizes are binary, as nvidia-smi/gpustat print them: ``MB`` = ``MiB`` =
2**20 bytes and ``GB`` = ``GiB`` = 2**30 bytes (a bare number is MB). A "32GB" V100 shows
32510 MiB in gpustat, so ``--device-memory 32GB`` (32768 MiB) is slightly generous for it; the
seed comparison uses 32510MB.

Notation: P backbone parameters, W ranks, B micro-batch per rank, D embedding size, C classes.

Engine (backbone, plus the FC [C, D] in the data-parallel cells) under ZeRO stage s, with
P' parameters (P' = P, or P + C*D for "DP ZeRO-s"), per rank:

* parameters: 4P' (fp32) or 2P' (fp16/bf16);   divided by W at stage 3
* master parameters: 4P' at stage 0 in fp16/bf16 (0 in fp32); 4P'/W at stage >= 1 in every precision
  (DeepSpeed's ZeRO optimizer clones an fp32 partition even from fp32 weights)
* gradients: 4P' (fp32) or 2P' (fp16/bf16);   / W at stage >= 2
* optimizer state: 4P' (SGD momentum) or 8P' (Adam/AdamW: two moments);   / W at stage >= 1

so 16 B/param for fp16 + Adam and 12 B/param for fp16 + SGD at stage 0 (the ZeRO paper's K = 12 or
8 plus 4 for 16-bit params and grads). Not counted: DeepSpeed's fp32 gradient partition for the
optimizer (its ZeRO-2 estimator adds 4P'/W), communication buckets and allocator fragmentation.
The FC is one parameter, and ZeRO works per parameter: at stage 3 the data-parallel cells also hold
the whole FC, gathered for its forward and backward (``fc_gathered``, C*D in the engine's precision),
and at stage >= 2 the FC's backward makes its whole gradient before ZeRO reduces and partitions it
(``fc_whole_gradient``: the (1 - 1/W) share the partition does not count, plus at stage 3 a copy in
the reduce bucket). So ZeRO-2 and -3 do not lower the peak of one giant layer the way they lower
a model of many layers (measured: ZeRO-2 = ZeRO-1, ZeRO-3 above both).

The classifier's step (``classifier_transients``, both kinds of cell), with A the rows a step uses
(C in the data-parallel cells, num_local = ceil(C / W) at model parallel, max(int(r*num_local), 1) at
rate r), N the samples it scores (B in the data-parallel cells, W*B in the sharded head), L = N*A*4
(one fp32 logit matrix) and R = A*D*4 (one fp32 [A, D]):

    max(6 L (+ R for a gathered copy of sampled rows),  3 R at rate 1.0 / 5 R for sampled rows)

the forward keeps up to six logit-sized tensors alive (the product, its column-scaled cosine, the clamp,
the margin's copy and its scaled copy, exp), backward and the optimizer step up to three or five
[A, D] tensors (gradient, the norm path's temporary, the one being summed in; for sampled rows also the
optimizer's gathered weight and state rows). In the data-parallel cells the FC's gradient is an engine
component, so one R less, and a 16-bit FC adds its fp32 copy (4*C*D): the logits run in fp32. These
counts are for ds_face's code (``ds_face.head.cosine``: the centres' norms divide the logits, no
normalised copy of the centres) and were measured on CPU; ``--measure`` checks them.

Head outside ZeRO ("Model parallel" = sample rate 1.0, "Partial FC r"), per rank, all fp32:

* head weight: num_local*D*4; head optimizer state: num_local*D*4 (SGD momentum) or x2 (AdamW)
  for the whole slice (``HeadOptimizer``);
* the classifier's step, above;
* embeddings: the all-gathered [W*B, D] fp32 and its gradient, 2 * W*B*D*4 (small).

The backbone of these cells is under ``--zero-stage`` (default 0, as the seed's DDP).

Activations: (elements a forward saves per 112x112 sample) x B x (2 B for fp16/bf16, 4 for fp32).
Elements per sample = the input plus the output numel of every leaf module (conv, batch norm,
PReLU, dropout, linear) of one forward on the meta device (r50: 18.1M, i.e. 34.5 MiB/sample in
fp16). This is an approximation: autograd saves a subset of these (or other tensors), backward
makes temporaries, kernels keep workspaces, and gradient checkpointing changes it entirely; override
it with ``--activation-mb-per-sample``. ``--measure`` measures it once per backbone and micro-batch
(a probe cell whose head is negligible) and uses that figure for the comparison.

Overhead: a fixed ``--overhead-mb`` per device (default 400: a CUDA context with cuDNN/cuBLAS is
300-500 MiB; use 0 for a bare tensor count). Measured figures are above a per-rank baseline, so the
comparison uses 0.

Measured (``--measure``): each cell runs ``--warmup`` + ``--steps`` real training steps on
``--world-size`` fresh local ranks with synthetic data (``ds_face.bench.cells``): peak resident memory
above the baseline on CPU ranks, peak allocated accelerator memory on GPUs. Printed: measured MiB ('-'
above ``--device-memory``, failed, or not run because it would not fit in host memory), measured /
estimated with the estimate's error, and samples/s.

Seed comparison (``--compare-seed``): /work/shared/seeds/003 table 2, 8x V100 32GB, r50, fp16,
batch 128/GPU, SGD, beside this estimator. See ``seed_comparison`` and the note printed with it.
"""
from __future__ import annotations

import argparse
import functools
import math
import re
import sys
import textwrap

MiB = 2**20
PRECISIONS = {"fp32": 4, "fp16": 2, "bf16": 2}  # bytes per parameter / activation element
OPTIMIZERS = {"sgd": 1, "adam": 2, "adamw": 2}  # fp32 states per parameter
IMAGE = (3, 112, 112)

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


# -- inputs --------------------------------------------------------------------------------------
_UNITS = {"": MiB, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": MiB, "mb": MiB, "mib": MiB,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'32GB', '32G', '24GiB', '32000MB', '32510' (MB) -> bytes; binary units (GB == GiB)."""
    m = re.fullmatch(r"\s*([+-]?[0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse memory size {text!r} (e.g. 32GB, 24GiB, 32000MB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value)


def parse_classes(text: str) -> list[int]:
    parts = [p.strip() for p in str(text).split(",")]
    if not text.strip() or any(not p.isdigit() or int(p) <= 0 for p in parts):
        raise ValueError(f"classes must be a comma-separated list of positive integers, got {text!r}")
    return [int(p) for p in parts]


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(p) for p in str(text).split(",")]
    except ValueError:
        raise ValueError(f"sample rates must be a comma-separated list of numbers, got {text!r}") from None
    bad = [r for r in rates if not 0.0 < r <= 1.0]
    if bad:
        raise ValueError(f"sample rates must be in (0, 1], got {bad[0]:g}")
    return rates


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
    """Estimated bytes per device, by component, for one cell (see the module docstring).

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
    from ds_face.bench import markdown_table
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
    from ds_face.bench import markdown_table
    rows = []
    for c, per_cell in results.items():
        for cell, r in per_cell.items():
            rows.append([f"{c:,}", cell] + [f"{v / MiB:,.0f}" for v in r["components"].values()]
                        + [f"{r['total_bytes'] / MiB:,.0f}"])
    keys = list(next(iter(next(iter(results.values())).values()))["components"])
    return markdown_table(["classes", "cell"] + keys + ["total"], rows)


def seed_comparison(overhead_bytes: float = 400 * MiB,
                    activation_bytes_per_sample: float | None = None) -> tuple[str, dict]:
    """The estimator at the seed's setting beside seeds/003 table 2 (MiB per GPU)."""
    from ds_face.bench import markdown_table
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


# -- CLI -----------------------------------------------------------------------------------------
def build_parser(prog: str = "python -m ds_face.bench memory", description: str | None = None,
                 measure_flag: bool = True) -> argparse.ArgumentParser:
    """The options of ``memory`` (also used by ``speed``, which always measures)."""
    p = argparse.ArgumentParser(prog=prog, description=description or __doc__.splitlines()[0])
    p.add_argument("--backbone", default="r50")
    p.add_argument("--embedding", type=int, default=512)
    p.add_argument("--classes", default="125000,1400000,5500000,29000000", help="comma-separated class counts")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=128, help="samples per rank per micro-step")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp16")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="sgd", help="for the engine and the head")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0,
                   help="ZeRO stage of the backbone in the Model parallel / Partial FC cells")
    p.add_argument("--sample-rates", default="0.1", help="Partial FC rates (< 1); 'Model parallel' is always shown")
    p.add_argument("--cells", help="only these cells, comma-separated (e.g. 'DP ZeRO-0,Model parallel,Partial FC 0.1')")
    p.add_argument("--device-memory", help="per-device budget (32GB, 24GiB, 32000MB; binary units): '-' above it")
    p.add_argument("--overhead-mb", type=float, default=400.0, help="fixed per-device overhead (CUDA context)")
    p.add_argument("--activation-mb-per-sample", type=float, help="override the leaf-module activation estimate")
    p.add_argument("--breakdown", action="store_true", help="also print each cell's components (MiB)")
    p.add_argument("--compare-seed", action="store_true", help="also print the estimator beside seeds/003 table 2")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON (bytes)")
    p.add_argument("--plot", metavar="PATH.png", help="also draw MiB per device against classes, a line per cell, "
                                                      "the budget dashed (measured figures as dots)")
    if measure_flag:
        p.add_argument("--measure", action="store_true",
                       help="also run a few real training steps per cell on --world-size fresh local ranks "
                            "(synthetic data) and print measured next to estimated")
    p.add_argument("--steps", type=int, default=3, help="measured: timed steps per cell")
    p.add_argument("--warmup", type=int, default=1, help="measured: untimed steps first")
    p.add_argument("--timeout", type=float, default=1800.0, help="measured: seconds a cell may take")
    return p


def parse_grid(p: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[int], list[str], int | None, dict]:
    """Check the options; returns class counts, cells, device budget (bytes or None), estimate() keywords."""
    from ds_face.backbones import BACKBONES
    if args.backbone not in BACKBONES:
        p.error(f"unknown backbone {args.backbone!r}; valid names: {', '.join(BACKBONES)}")
    for label, value in (("--world-size", args.world_size), ("--micro-batch", args.micro_batch),
                         ("--embedding", args.embedding), ("--steps", args.steps)):
        if value <= 0:
            p.error(f"{label} must be a positive integer, got {value}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.overhead_mb < 0:
        p.error(f"--overhead-mb must be >= 0, got {args.overhead_mb:g}")
    if args.activation_mb_per_sample is not None and args.activation_mb_per_sample < 0:
        p.error(f"--activation-mb-per-sample must be >= 0, got {args.activation_mb_per_sample:g}")
    try:
        classes = parse_classes(args.classes)
        rates = parse_rates(args.sample_rates)
        device = parse_memory(args.device_memory) if args.device_memory is not None else None
        if args.cells:
            cells = [c.strip() for c in args.cells.split(",")]
            for cell in cells:
                parse_cell(cell)
        else:
            cells = [dp_cell(s) for s in range(4)] + ["Model parallel"]
            cells += [pfc_cell(r) for r in rates if r < 1.0 and pfc_cell(r) not in cells]
    except ValueError as e:
        p.error(str(e))
    too_few = [c for c in classes if c < args.world_size]
    if too_few:
        p.error(f"--classes: {too_few[0]} classes cannot be split over {args.world_size} ranks")
    if getattr(args, "measure", True):  # speed always measures
        from ds_face.bench.cells import unsupported
        reason = unsupported(args.precision)
        if reason:
            p.error(f"cannot measure --precision {args.precision} here: {reason}")
        from deepspeed.accelerator import get_accelerator
        accelerator = get_accelerator()
        if accelerator.device_name() != "cpu" and args.world_size > accelerator.device_count():
            p.error(f"--world-size {args.world_size}: this machine has {accelerator.device_count()} "
                    f"{accelerator.device_name()} device(s); measured cells run one rank per device")
    act = None if args.activation_mb_per_sample is None else args.activation_mb_per_sample * MiB
    kw = dict(backbone=args.backbone, embedding=args.embedding, world_size=args.world_size,
              micro_batch=args.micro_batch, precision=args.precision, optimizer=args.optimizer,
              zero_stage=args.zero_stage, overhead_bytes=args.overhead_mb * MiB, activation_bytes_per_sample=act)
    return classes, cells, device, kw


def measured_setting(args):
    from ds_face.bench.cells import Setting
    return Setting(backbone=args.backbone, embedding=args.embedding, world_size=args.world_size,
                   micro_batch=args.micro_batch, precision=args.precision, optimizer=args.optimizer,
                   zero_stage=args.zero_stage, steps=args.steps, warmup=args.warmup)


def run_measured(classes: list[int], cells: list[str], kw: dict, args, for_memory: bool = True) -> tuple[dict, dict, dict]:
    """Measure every cell; returns (measured, estimates those are compared with, calibration).

    The estimates here have no fixed overhead (measured figures are above a baseline taken after start-up)
    and the backbone's activations measured once by a probe cell, unless --activation-mb-per-sample is given.
    """
    from ds_face.bench.cells import calibrate_activations, measure_grid
    setting = measured_setting(args)
    calibration = {"leaf_module_bytes_per_sample": activation_elements_per_sample(args.backbone, args.embedding)
                   * PRECISIONS[args.precision]}
    act = kw["activation_bytes_per_sample"]
    if act is None and for_memory:
        print(f"measuring the activation figure once ({args.backbone}, micro-batch {args.micro_batch}, "
              f"{args.precision}) ...", file=sys.stderr, flush=True)
        act, probe = calibrate_activations(setting, args.timeout)
        calibration.update(measured_bytes_per_sample=act, probe=probe)
    compare_kw = {**kw, "overhead_bytes": 0, "activation_bytes_per_sample": act}
    _, estimates = table(classes, cells, None, **compare_kw)
    return measure_grid(classes, cells, setting, estimates, args.timeout, for_memory), estimates, calibration


def measured_tables(measured: dict, estimates: dict, device_bytes: int | None) -> tuple[str, str]:
    """(measured MiB per device, '-' over the budget or failed; measured vs estimated with the error)."""
    from ds_face.bench import markdown_table
    cells = list(next(iter(measured.values())))
    rows, errors = [], []
    for c, per_cell in measured.items():
        row, err = [f"{c:,}"], [f"{c:,}"]
        for cell in cells:
            m, e = per_cell[cell], estimates[c][cell]["total_bytes"]
            if "peak_bytes" in m:
                fits = device_bytes is None or m["peak_bytes"] <= device_bytes
                row.append(f"{m['peak_bytes'] / MiB:,.0f}" if fits else "-")
                err.append(f"{m['peak_bytes'] / MiB:,.0f} / {e / MiB:,.0f} ({(e - m['peak_bytes']) / m['peak_bytes']:+.0%})")
            else:
                row.append("-")
                err.append(f"not run / {e / MiB:,.0f}" if "skipped" in m else f"failed / {e / MiB:,.0f}")
        rows.append(row)
        errors.append(err)
    return markdown_table(["classes"] + cells, rows), markdown_table(["classes"] + cells, errors)


def cell_notes(measured: dict) -> str:
    return "\n".join(f"- {c:,}, {cell}: {m.get('skipped') or m.get('error')}"
                      for c, per_cell in measured.items() for cell, m in per_cell.items()
                      if "skipped" in m or "error" in m)


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


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    classes, cells, device, kw = parse_grid(p, args)
    text, results = table(classes, cells, device, **kw)
    act = kw["activation_bytes_per_sample"]
    per_sample = act if act is not None else \
        activation_elements_per_sample(args.backbone, args.embedding) * PRECISIONS[args.precision]
    budget = f", budget {device / MiB:,.0f} MiB" if device else ""
    print(f"{args.backbone} ({backbone_params(args.backbone, args.embedding) / 1e6:.1f}M params), embedding "
          f"{args.embedding}, {args.world_size} ranks x micro-batch {args.micro_batch}, {args.precision}, "
          f"{args.optimizer}; activations {per_sample / MiB:.1f} MiB/sample, overhead {args.overhead_mb:g} MiB"
          f"{budget}. Estimated MiB per device ('-': over budget):\n")
    print(text)
    if args.breakdown:
        print("\nBreakdown (MiB per device):\n\n" + breakdown_table(results))
    out = {"setting": {k: v for k, v in kw.items()}, "device_memory_bytes": device,
           "activation_bytes_per_sample": per_sample,
           "results": {str(c): r for c, r in results.items()}}
    if args.compare_seed:
        seed_text, seed_data = seed_comparison(args.overhead_mb * MiB, act)
        print("\nSeed comparison (seeds/003 table 2: 8x V100 32GB, r50, fp16, batch 128/GPU; MiB per GPU; "
              "estimates in parentheses exceed 32510 MiB):\n\n" + seed_text + "\n\n"
              + textwrap.fill(" ".join(SEED_NOTE.split()), 110))
        out["seed_comparison"] = {str(c): d for c, d in seed_data.items()}
    if args.measure:
        measured, estimates, calibration = run_measured(classes, cells, kw, args)
        measured_text, error_text = measured_tables(measured, estimates, device)
        from ds_face.bench.cells import host_memory_available
        where = ("peak resident memory above each rank's baseline" if host_memory_available() is not None
                 else "peak allocated accelerator memory above each rank's baseline")
        act_note = (f"activations measured once: {calibration['measured_bytes_per_sample'] / MiB:.2f} MiB/sample "
                    f"(leaf-module count: {calibration['leaf_module_bytes_per_sample'] / MiB:.2f})"
                    if "measured_bytes_per_sample" in calibration else
                    f"activations {act / MiB:.2f} MiB/sample as given")
        print(f"\nMeasured MiB per device ({where}, the largest rank; "
              f"{args.warmup} + {args.steps} steps per cell; '-': over budget, failed or not run):\n\n"
              f"{measured_text}\n\nMeasured / estimated MiB (estimate error), estimates without overhead and with "
              f"{act_note}:\n\n{error_text}")
        from ds_face.bench.speed import speed_tables
        speed, ratios = speed_tables(measured, "Model parallel" if "Model parallel" in cells else None)
        print(f"\nMeasured samples/s (the same steps, with glibc returning freed memory at once, which the memory "
              f"figures need and which slows CPU steps; `python -m ds_face.bench speed` measures without):\n\n{speed}"
              + (f"\n\nEach cell / Model parallel:\n\n{ratios}" if ratios else ""))
        notes = cell_notes(measured)
        if notes:
            print("\n" + notes)
        out["measured"] = {str(c): r for c, r in measured.items()}
        out["measured_vs"] = {str(c): {cell: r["total_bytes"] for cell, r in per.items()} for c, per in estimates.items()}
        out["calibration"] = calibration
    if args.json:
        from ds_face.fileio import write_json_atomic
        write_json_atomic(args.json, out)
    if args.plot:
        title = (f"{args.backbone}, {args.world_size} ranks x micro-batch {args.micro_batch}, {args.precision}, "
                 f"{args.optimizer}")
        if args.measure:  # the estimates the measurement is compared with (no overhead, measured activations)
            plot(args.plot, estimates, device, title + " (measured and estimated)", measured)
        else:
            plot(args.plot, results, device, title + " (estimated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
