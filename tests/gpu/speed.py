"""Training speed: ds_face's step (the DeepSpeed engine + Partial FC, ``ds_face.training.trainer.micro_step``) against a
plain PyTorch loop of the shape of arcface_torch's ``train_v2.py``, in the same processes, on the same batches.

The plain loop (``plain_step``), as arcface_torch's: the backbone under ``DistributedDataParallel``
(``broadcast_buffers=False``, ``bucket_cap_mb=16``, ``find_unused_parameters=True``), its forward under
``torch.autocast`` (fp16 with a ``GradScaler``, or bf16), the embeddings cast to fp32 for the head,
the backbone's gradient norm clipped at 5 after unscaling, SGD. The head maths are the same module as
ds_face's (``ds_face.head``: the same Partial FC, margin, distributed cross-entropy and sparse SGD), so the
ratio ds_face / plain measures what the engine costs or saves around the same backbone and head.

On each rank (``speed_pair``): the batches are made and put on the device first (``cells.staged_batches``);
the plain loop runs its warm-up and timed steps and is freed; then ds_face's cell (``cells.build_step``, the
code ``python -m ds_face.bench speed`` measures) runs on the same batches with its peak allocated memory
above the baseline taken after the plain loop was freed. Timing: ``cells.timed_steps`` (a barrier and a
device synchronisation on both sides of every step).
"""
from __future__ import annotations

import gc
import statistics

import torch

from ds_face.bench.cells import PeakMemory, Setting, build_step, local_device_facts, staged_batches, timed_steps
from ds_face.bench.configs import run_config
from ds_face.bench.estimator import MiB, estimate, pfc_cell, total

AMP = {"fp16": torch.float16, "bf16": torch.bfloat16}  # fp32: autocast off


def plain_step(setting: Setting, classes: int, rate: float):
    """arcface_torch's train_v2.py step around ds_face's head: returns ``step(images, labels)``."""
    from deepspeed.accelerator import get_accelerator
    from torch.nn.parallel import DistributedDataParallel

    from ds_face.backbones import get_backbone
    from ds_face.data.arrow import normalize
    from ds_face.head import build_head
    from ds_face.training.trainer import build_backbone_optimizer, seed_everything

    device = torch.device(get_accelerator().current_device_name())
    samples = (setting.warmup + setting.steps) * setting.micro_batch * setting.world_size
    cfg = run_config(setting.backbone, setting.embedding, classes, rate, samples, setting.seed, setting.optimizer)
    seed_everything(setting.seed)  # the same initial weights as the engine's cell
    backbone = get_backbone(setting.backbone, setting.embedding).to(device)
    model = DistributedDataParallel(backbone, device_ids=None if device.index is None else [device.index],
                                    broadcast_buffers=False, bucket_cap_mb=16, find_unused_parameters=True)
    optimizer = build_backbone_optimizer(cfg, backbone)
    head, head_optimizer = build_head(cfg, device)
    amp = AMP.get(setting.precision)
    # arcface_torch: GradScaler(growth_interval=100); the first scale as the engine's (2^8, bench/configs.py)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**8, growth_interval=100) \
        if setting.precision == "fp16" else None
    lr = cfg.optimizer.lr

    def step(images, labels):
        if images.dtype == torch.uint8:  # as micro_step: loaders ship uint8 NHWC, normalised on the device
            images = normalize(images)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            embeddings = model(images)
        loss = head(embeddings.float(), labels)
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            scale = 1.0
            loss.backward()
        if setting.clipping:
            torch.nn.utils.clip_grad_norm_(backbone.parameters(), setting.clipping)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
            applied = scaler.get_scale() >= scale  # the scaler lowers its scale exactly when it skipped the step
        else:
            optimizer.step()
            applied = True
        optimizer.zero_grad(set_to_none=True)
        head_optimizer.step(lr, scale, engine_applied=applied)  # the head follows, as it follows the engine
        return loss.detach()

    return step


def speed_pair(rank: int, world_size: int, setting: Setting, classes: int, rate: float) -> dict:
    """On each rank: the plain loop, then ds_face's cell, on the same staged batches (see the module doc)."""
    import logging

    import deepspeed
    from deepspeed.accelerator import get_accelerator
    deepspeed.utils.logger.setLevel(logging.WARNING)
    facts = local_device_facts()
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # as arcface_torch's train_v2.py; the same for both loops
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = setting.precision == "tf32"
    batches = staged_batches(setting, classes, rank)
    out = {"device": get_accelerator().current_device_name(), "names": facts["names"]}
    for name, build in (("plain", lambda: plain_step(setting, classes, rate)),
                        ("ds_face", lambda: build_step(pfc_cell(rate), classes, setting))):
        memory = PeakMemory()
        memory.start()
        step = build()
        times, losses = timed_steps(step, batches, setting.warmup)
        out[name] = {"ms_mean": 1000 * statistics.mean(times), "peak_bytes": memory.peak_bytes(), "losses": losses}
        del step
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def measure_pair(setting: Setting, classes: int, rate: float, timeout: float = 900.0) -> dict:
    """``speed_pair`` on ``setting.world_size`` fresh ranks (the accelerator's backend: NCCL on GPUs, one GPU
    per rank); samples/s of each loop (the slowest rank's mean step), the ratio, peaks and the estimate."""
    from ds_face.runtime.spawn import run_ranks
    per_rank = run_ranks(setting.world_size, speed_pair, setting, classes, rate, timeout=timeout, backend=None)
    result = {"device": per_rank[0]["device"], "names": per_rank[0]["names"]}
    for name in ("plain", "ds_face"):
        slowest = max(r[name]["ms_mean"] for r in per_rank)
        result[name] = {"samples_per_s": setting.world_size * setting.micro_batch / (slowest / 1000),
                        "ms_per_step": slowest, "peak_mib_by_rank": [r[name]["peak_bytes"] / MiB for r in per_rank],
                        "losses": per_rank[0][name]["losses"]}
    result["ratio"] = result["ds_face"]["samples_per_s"] / result["plain"]["samples_per_s"]
    precision = setting.precision if setting.precision in ("fp32", "fp16", "bf16") else "fp32"
    result["estimate_mib"] = total(estimate(setting.backbone, setting.embedding, classes, setting.world_size,
                                            setting.micro_batch, precision, setting.optimizer, pfc_cell(rate),
                                            zero_stage=setting.zero_stage, overhead_bytes=0)) / MiB
    return result
