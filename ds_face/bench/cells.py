"""Measure cells: a few real training steps of one (cell, class count) on fresh ranks; peak memory and speed.

A cell is where the classification layer lives (see ``ds_face.bench.memory``):

* ``DP ZeRO-s``: the FC [C, D] is a parameter of the model inside the DeepSpeed engine, next to the
  backbone, under ZeRO stage s; every rank computes its own micro-batch's logits against all C classes
  (data parallel, as arcface_torch before Partial FC). ZeRO partitions the FC's optimizer state,
  gradients and (stage 3) parameters like any other parameter.
* ``Model parallel`` / ``Partial FC r``: the project's own wiring (``ds_face.training.trainer.Trainer``): the
  backbone in the engine under ``zero_stage``, the head outside it, sharded over ranks, at rate 1.0 / r.

Each cell runs in W fresh processes (``ds_face.runtime.spawn.run_ranks``) so that it inherits no memory from
the cell before. Per rank: the baseline is taken after imports, process-group set-up and the synthetic
batches, just before the model is built; the peak is

* on CPU ranks: the peak resident set (VmHWM, reset to the baseline through /proc/self/clear_refs)
  minus the baseline. glibc's malloc is told to return every block of 64 KiB and more to the kernel when
  freed (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live tensors rather than glibc's
  retained heap;
* on GPUs: the accelerator's peak allocated memory minus the allocated baseline (what PyTorch's caching
  allocator handed out; nvidia-smi shows more: the CUDA context and the allocator's reserve).

Speed is samples per second over the timed steps: W x micro-batch / the slowest rank's mean step time,
each step started together after a barrier. The synthetic batches are made and put on the rank's device
before the clock starts (no host-to-device copy is timed), and the device is synchronised on both sides
of each timed step (a GPU runs the step's kernels asynchronously).

The parent process never asks the GPU anything itself (``device_facts``): a capability probe there would
open a CUDA context on GPU 0 that stays beside rank 0's for the whole run.
"""
from __future__ import annotations

import functools
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ds_face.bench import proc_status_kb, reset_peak_rss
from ds_face.bench.estimator import estimate, parse_cell, total
from ds_face.bench.configs import ds_config, run_config
from ds_face.head import Margin, cosine
from ds_face.runtime.cpus import threads_per_rank

MiB = 2**20


@dataclass(frozen=True)
class Setting:
    """Everything a cell's run depends on, besides the cell and the class count."""
    backbone: str = "r_tiny"
    embedding: int = 512
    world_size: int = 2
    micro_batch: int = 32
    precision: str = "fp32"  # fp32, tf32 (GPU: fp32 weights, TF32 matmuls), fp16, bf16
    optimizer: str = "sgd"
    zero_stage: int = 0  # the backbone's stage in the head-outside-ZeRO cells
    steps: int = 3  # timed steps
    warmup: int = 1  # untimed steps first (the first step allocates the optimizer state)
    seed: int = 2048
    clipping: float = 0.0  # the engine's gradient_clipping (0: off)


class DataParallelFC(nn.Module):
    """Backbone + an ArcFace FC [C, D] inside one module, so that the engine (and ZeRO) holds both."""

    def __init__(self, backbone: nn.Module, embedding: int, classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Parameter(torch.normal(0.0, 0.01, (classes, embedding)))  # arcface_torch's init
        self.margin = Margin.arcface()

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embeddings = self.backbone(images)
        # Logits and softmax in fp32 whatever the engine's precision, as the Partial FC head does.
        cos = cosine(embeddings.float(), self.fc.float()).clamp(-1.0, 1.0)  # the head's own formula
        rows = torch.arange(labels.numel(), device=labels.device)
        return F.cross_entropy(self.margin.logits(cos, rows, labels), labels)


def build_step(cell: str, classes: int, setting: Setting):
    """The cell's model, engine and optimizers on this rank; returns ``step(images, labels)``."""
    import deepspeed

    from ds_face.backbones import get_backbone
    from ds_face.config import BatchLayout
    from ds_face.training.trainer import Trainer, build_backbone_optimizer, micro_step, seed_everything

    kind, arg = parse_cell(cell)
    samples = (setting.warmup + setting.steps) * setting.micro_batch * setting.world_size
    cfg = run_config(setting.backbone, setting.embedding, classes, 1.0 if kind == "dp" else arg, samples,
                     setting.seed, setting.optimizer)
    if kind == "head":
        trainer = Trainer(cfg, ds_config(setting.micro_batch, setting.zero_stage, precision=setting.precision,
                                         clipping=setting.clipping),
                          BatchLayout(setting.micro_batch, 1, setting.world_size))
        return lambda images, labels: micro_step(trainer.engine, trainer.head, trainer.head_optimizer,
                                                 {"image": images, "label": labels}, cfg.optimizer.lr).loss
    seed_everything(setting.seed)
    from deepspeed.accelerator import get_accelerator
    with torch.device(get_accelerator().current_device_name()):  # on a GPU, not W copies of the FC in host memory
        model = DataParallelFC(get_backbone(setting.backbone, setting.embedding), setting.embedding, classes)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_backbone_optimizer(cfg, model),
                                           config=ds_config(setting.micro_batch, arg, precision=setting.precision,
                                                            clipping=setting.clipping))
    dtype = next(p for p in engine.module.parameters()).dtype

    def step(images, labels):  # the batches are on the device already (staged_batches): a cast, no copy
        loss = engine(images.to(engine.device, dtype=dtype), labels.to(engine.device))
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step


def local_device_facts() -> dict:
    """What this process's accelerator is and can do (DeepSpeed's checks). On a GPU this opens a CUDA context:
    call it in a rank, or on CPU; a parent process asks ``device_facts()``."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    cuda = acc.device_name() == "cuda"
    props = [torch.cuda.get_device_properties(i) for i in range(acc.device_count())] if cuda else []
    return {"device": acc.device_name(), "count": acc.device_count() if acc.device_name() != "cpu" else 0,
            "names": [p.name for p in props], "memory_bytes": [p.total_memory for p in props],
            "capability": [[p.major, p.minor] for p in props],
            "fp16": bool(acc.is_fp16_supported()), "bf16": bool(acc.is_bf16_supported())}


@functools.lru_cache(maxsize=1)
def device_facts() -> dict:
    """``local_device_facts()`` without touching a GPU here: on a GPU machine it is asked in a short-lived
    child process (the probes, e.g. torch.cuda.get_device_capability, open a CUDA context on GPU 0, which
    would then sit in GPU 0's memory beside rank 0's for the whole run). On CPU it is asked here."""
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() == "cpu":  # DeepSpeed found no GPU: nothing to open a context on
        return local_device_facts()
    root = str(Path(__file__).resolve().parents[2])  # this checkout's ds_face, whatever the child's cwd
    probe = (f"import json, sys; sys.path.insert(0, {root!r}); from ds_face.bench.cells import local_device_facts; "
             "print(json.dumps(local_device_facts()))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        raise RuntimeError(f"the accelerator probe (a child process) failed: {tail[0]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def unsupported(precision: str, facts: dict | None = None) -> str | None:
    """Why this machine cannot train in ``precision`` (None if it can): DeepSpeed's own checks, from ``facts``
    (default: ``device_facts()``, safe in a parent process)."""
    facts = device_facts() if facts is None else facts
    name = facts["device"]
    if precision == "fp16" and not facts["fp16"]:
        return f"fp16 is not supported on this {name} accelerator (DeepSpeed's check)"
    if precision == "bf16" and not facts["bf16"]:
        return f"bf16 is not supported on this {name} accelerator (DeepSpeed's check)"
    if precision == "tf32" and not (name == "cuda" and facts["capability"]
                                    and min(major for major, _ in facts["capability"]) >= 8):
        return "tf32 needs an NVIDIA GPU of compute capability 8.0 (Ampere) or newer"
    return None


def staged_batches(setting: Setting, classes: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's synthetic (images, labels) for every warm-up and timed step, already on its device:
    no host-to-device copy happens inside a timed step."""
    from deepspeed.accelerator import get_accelerator
    device = get_accelerator().current_device_name()
    gen = torch.Generator().manual_seed(setting.seed * 100 + rank)
    batches = [(torch.randn(setting.micro_batch, 3, 112, 112, generator=gen).to(device),
                torch.randint(0, classes, (setting.micro_batch,), generator=gen).to(device))
               for _ in range(setting.warmup + setting.steps)]
    get_accelerator().synchronize()
    return batches


def timed_steps(step, batches: list, warmup: int) -> tuple[list[float], list[float]]:
    """Run ``step(images, labels)`` on every batch; seconds of each step after ``warmup``, and every loss.
    The ranks start each step together (a barrier) and the device is synchronised before the clock starts
    and before it stops."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    times, losses = [], []
    for i, (images, labels) in enumerate(batches):
        torch.distributed.barrier()  # start together: a lagging rank would bill its wait to the next step
        acc.synchronize()
        start = time.perf_counter()
        out = step(images, labels)
        acc.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        losses.append(float(out))
    return times, losses


# -- one rank ------------------------------------------------------------------------------------
class PeakMemory:
    """This rank's peak memory above the moment ``start()`` was called (see the module docstring)."""

    def __init__(self):
        from deepspeed.accelerator import get_accelerator
        self.accelerator = get_accelerator()
        self.on_cpu = self.accelerator.device_name() == "cpu"

    def start(self) -> None:
        if self.on_cpu:
            self.baseline = proc_status_kb("VmRSS") * 1024
            if not reset_peak_rss():
                raise RuntimeError("cannot reset the peak resident set (/proc/self/clear_refs needs Linux >= 4.0): "
                                   "the measured peak would include start-up")
        else:
            self.accelerator.synchronize()
            self.baseline = self.accelerator.memory_allocated()
            self.accelerator.reset_peak_memory_stats()

    def peak_bytes(self) -> int:
        if self.on_cpu:
            return proc_status_kb("VmHWM") * 1024 - self.baseline
        self.accelerator.synchronize()
        return self.accelerator.max_memory_allocated() - self.baseline


def measure_rank(rank: int, world_size: int, cell: str, classes: int, setting: Setting) -> dict:
    """Run on each rank of a fresh process group (``ds_face.runtime.spawn.run_ranks``)."""
    import logging

    import deepspeed
    deepspeed.utils.logger.setLevel(logging.WARNING)
    reason = unsupported(setting.precision, local_device_facts())  # a rank may ask its own device
    if reason:
        raise RuntimeError(reason)
    if torch.cuda.is_available():  # "fp32" means no TF32 anywhere; "tf32" allows it in matmuls and convolutions
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = setting.precision == "tf32"
    batches = staged_batches(setting, classes, rank)  # before the baseline: the batches are not the cell's
    memory = PeakMemory()
    memory.start()
    step = build_step(cell, classes, setting)
    times, losses = timed_steps(step, batches, setting.warmup)
    return {"peak_bytes": memory.peak_bytes(), "baseline_bytes": memory.baseline, "ms_mean": 1000 * statistics.mean(times),
            "last_loss": losses[-1]}


# -- one cell on fresh ranks -----------------------------------------------------------------------
def measure_cell(cell: str, classes: int, setting: Setting, timeout: float = 1800.0, for_memory: bool = True) -> dict:
    """Peak MiB (the largest over ranks), samples/s and the last loss; ``error`` instead if a rank failed.

    ``for_memory``: glibc returns freed blocks at once (see the module docstring); costs some speed on CPU,
    so ``speed`` and ``report`` leave it off.
    """
    from ds_face.runtime.spawn import RankFailed, run_ranks
    threads = threads_per_rank(setting.world_size)
    env = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)} if for_memory else {}
    try:
        per_rank = run_ranks(setting.world_size, measure_rank, cell, classes, setting, timeout=timeout,
                             threads=threads, env=env, backend=None)
    except RankFailed as failed:
        # the rank the kernel killed (out of memory) first: its peers only report a lost connection
        rank, text = min(failed.errors.items(), key=lambda item: (item[1] != "exit code -9", item[0]))
        last = text.strip().splitlines()[-1] if text.strip() else text
        if text == "exit code -9":
            last += " (killed: out of memory?)"
        return {"error": f"rank {rank}: {last}"}
    slowest = max(r["ms_mean"] for r in per_rank)
    return {"peak_bytes": max(r["peak_bytes"] for r in per_rank),
            "peak_bytes_by_rank": [r["peak_bytes"] for r in per_rank],
            "samples_per_s": setting.world_size * setting.micro_batch / (slowest / 1000),
            "ms_per_step": slowest, "last_loss": per_rank[0]["last_loss"],
            "finite_loss": all(math.isfinite(r["last_loss"]) for r in per_rank)}


# -- a grid of cells -------------------------------------------------------------------------------
def calibrate_activations(setting: Setting, timeout: float = 1800.0) -> tuple[float, dict]:
    """Activation bytes per sample of the backbone, measured once: a cell whose head is negligible
    (Partial FC 0.1 over 1,000 classes x world size), minus everything else the estimator counts.

    The figure also absorbs whatever a rank allocates that does not grow with the class count (kernel
    workspaces, communication buffers, errors in the backbone's engine terms), so the comparison that
    follows checks the terms that grow with C: the classifier's."""
    classes = 1000 * setting.world_size
    probe = measure_cell("Partial FC 0.1", classes, setting, timeout)
    if "error" in probe:
        raise RuntimeError(f"the activation probe failed: {probe['error']}")
    rest = total(estimate(setting.backbone, setting.embedding, classes, setting.world_size, setting.micro_batch,
                          setting.precision, setting.optimizer, "Partial FC 0.1", zero_stage=setting.zero_stage,
                          activation_bytes_per_sample=0, overhead_bytes=0))
    if probe["peak_bytes"] < rest:
        print(f"warning: the activation probe measured less than the estimate without activations "
              f"({probe['peak_bytes'] / MiB:,.0f} < {rest / MiB:,.0f} MiB); using 0 for activations", file=sys.stderr)
    return max(probe["peak_bytes"] - rest, 0) / setting.micro_batch, probe


def host_memory_available() -> int | None:
    """Bytes the OS could give to CPU ranks now; None on GPUs (a cell there that does not fit fails: '-')."""
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() != "cpu":
        return None
    import psutil
    return psutil.virtual_memory().available


def measure_grid(classes: list[int], cells: list[str], setting: Setting, estimates: dict,
                 timeout: float = 1800.0, for_memory: bool = True) -> dict:
    """``{C: {cell: measure_cell(...) result}}``; on CPU a cell whose estimate for all ranks exceeds 80% of
    the memory available now is not started (``skipped``): the kernel's OOM killer might pick any process."""
    from tqdm import tqdm
    available = host_memory_available()
    out = {c: {} for c in classes}
    todo = [(c, cell) for c in classes for cell in cells]
    for c, cell in tqdm(todo, desc="cells", unit="cell", disable=None):
        need = estimates[c][cell]["total_bytes"] * setting.world_size
        if available is not None and need > 0.8 * available:
            out[c][cell] = {"skipped": f"estimated {need / MiB:,.0f} MiB for {setting.world_size} ranks > 80% of "
                                       f"the {available / MiB:,.0f} MiB available"}
            continue
        out[c][cell] = measure_cell(cell, c, setting, timeout, for_memory)
    return out
