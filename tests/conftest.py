"""Helpers the test files share: the launcher command, one trainer factory, test images, Arrow shards.

They are plain functions, not fixtures, because most run inside rank processes (``ds_face.runtime.spawn.run_ranks``)
where fixtures do not reach; import them with ``from tests.conftest import ...``.
"""
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ds_face.runtime.spawn import free_port, run_command

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def launch(*args, timeout=300):
    """`deepspeed --num_gpus 2 --module ds_face.train ARGS`, as a user launches it, from the repository."""
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ds_face.train", *args]
    return run_command(cmd, cwd=ROOT, timeout=timeout)  # a deadline a busy machine stretches (ds_face.runtime.spawn)


# -- trainers ----------------------------------------------------------------------------------------
# The small run the resume tests share: 50 classes (25/25 on 2 ranks, 17/17/16 on 3), 2 epochs with a
# warm-up, clipping on, and sampling (its RNG must resume too).
RESUMABLE = dict(classes=50, clip=5.0, sample_rate=0.5, epochs=2, warmup_epochs=0.5, samples=96)


def make_trainer(world_size, out_dir=None, stage=2, precision="fp32", *, classes, micro=8, accumulation=1,
                 clip=None, embedding=32, sample_rate=1.0, optimizer="sgd", epochs=None, warmup_epochs=None,
                 max_steps=None, samples=1000, data=None, every=None, keep_last=None, init_backbone=None,
                 extra_ds=None):
    """A real ``Trainer`` of an r_tiny backbone on this rank. ``None``: the run config's default (and no
    ``gradient_clipping`` in the DeepSpeed JSON); ``out_dir`` None: a fresh temporary directory; ``data``
    None: ``samples`` synthetic images an epoch; AdamW runs at lr 1e-3 (SGD's 0.1 would diverge)."""
    from ds_face.config import (
        BatchLayout, CheckpointConfig, DataConfig, HeadConfig, ModelConfig, OptimizerConfig, OutputConfig, RunConfig,
        ScheduleConfig,
    )
    from ds_face.train import Trainer
    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731
    ds = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
          **given(gradient_clipping=clip), "zero_optimization": {"stage": stage},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    if precision == "fp16":
        # dynamic scaling from a low first scale, halved at the first overflow: few skipped steps
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "hysteresis": 1}
    elif precision == "bf16":
        ds["bf16"] = {"enabled": True}
    ds.update(extra_ds or {})
    cfg = RunConfig(model=ModelConfig(backbone="r_tiny", embedding_size=embedding),
                    head=HeadConfig(num_classes=classes, sample_rate=sample_rate),
                    optimizer=OptimizerConfig(name=optimizer, lr=0.1 if optimizer == "sgd" else 1e-3),
                    schedule=ScheduleConfig(**given(epochs=epochs, warmup_epochs=warmup_epochs), max_steps=max_steps),
                    data=data or DataConfig(num_samples=samples),
                    output=OutputConfig(dir=str(out_dir or tempfile.mkdtemp()), tensorboard=False),
                    checkpoint=CheckpointConfig(**given(every_steps=every, keep_last=keep_last)))
    return Trainer(cfg, ds, BatchLayout(micro, accumulation, world_size), init_backbone=init_backbone)


# -- images ------------------------------------------------------------------------------------------
def encode(pixels: np.ndarray, format: str = "PNG", **options) -> bytes:
    """uint8 [H, W, 3] -> PNG (lossless: the pixels come back exact) or JPEG bytes, through PIL."""
    from PIL import Image
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=format, **options)
    return out.getvalue()


def face(label: int, rng) -> np.ndarray:
    """112x112 uint8: the synthetic class pattern plus noise, so that classes can be learnt and told apart."""
    from ds_face.data.synthetic import class_pattern
    pattern = class_pattern(label).numpy().transpose(1, 2, 0).repeat(14, 0).repeat(14, 1)
    return ((pattern + rng.normal(0, 0.3, pattern.shape)).clip(-1, 1) * 127.5 + 127.5).astype(np.uint8)


def index_png(index: int) -> bytes:
    """A 112x112 PNG whose pixels spell out a sample's index: red/green = index, blue = the column number, so
    a flipped image reads its columns backwards."""
    pixels = np.zeros((112, 112, 3), np.uint8)
    pixels[..., 0], pixels[..., 1] = index // 256, index % 256
    pixels[..., 2] = np.arange(112)[None, :]
    return encode(pixels)


# -- datasets ----------------------------------------------------------------------------------------
def write_shards(directory, num_samples: int, num_shards: int, num_classes: int = 10, images=None):
    """Shards exactly as ds_face/data/shards.py specifies; sample i has label i % num_classes and, unless
    ``images`` gives it other bytes, ``index_png(i)``."""
    import pyarrow as pa

    from ds_face.data.shards import SCHEMA, Manifest, ShardInfo, rows_per_shard, sha256_of, shard_name
    os.makedirs(directory, exist_ok=True)
    images = images or {}
    infos, start = [], 0
    for s, rows in enumerate(rows_per_shard(num_samples, num_shards)):
        path = os.path.join(directory, shard_name(s, num_shards))
        index = list(range(start, start + rows))
        table = pa.table({"image": [images.get(i) or index_png(i) for i in index],
                          "label": [i % num_classes for i in index], "index": index}, schema=SCHEMA)
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
            writer.write_table(table, max_chunksize=64)
        infos.append(ShardInfo(shard_name(s, num_shards), rows, os.path.getsize(path), sha256_of(path)))
        start += rows
    Manifest(num_samples=num_samples, num_classes=num_classes, shards=infos).write(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An r_tiny (embedding 32) with non-trivial BatchNorm statistics, so eval vs train mode would show, and its
    model.pt: (path, model in eval mode). Used by the evaluation tests (.bin and IJB)."""
    import torch

    from ds_face.backbones import get_backbone
    torch.manual_seed(0)
    model = get_backbone("r_tiny", 32)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(model.state_dict(), path)
    return path, model.eval()
