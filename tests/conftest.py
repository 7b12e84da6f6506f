"""Helpers the test files share: the launcher command, one trainer factory, test images, Arrow shards.

They are plain functions, not fixtures, because most run inside rank processes (``ds_face.runtime.spawn.run_ranks``)
where fixtures do not reach; import them with ``from tests.conftest import ...``.
"""
import concurrent.futures
import functools
import importlib
import inspect
import io
import multiprocessing
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest

from ds_face.runtime.spawn import free_port, run_command, run_ranks

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def launch(*args, timeout=300):
    """`deepspeed --num_gpus 2 --module ds_face.train ARGS`, as a user launches it, from the repository."""
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "ds_face.train", *args]
    return run_command(cmd, cwd=ROOT, timeout=timeout)  # a deadline a busy machine stretches (ds_face.runtime.spawn)


def in_turn(rank: int, world_size: int, runs: dict[str, tuple]) -> dict:
    """``{name: function(rank, world_size, *args)}`` for each ``name: (function, args)`` of ``runs``, one after
    the other on these ranks: several runs for one process start-up (seconds of imports per rank). For
    ``run_ranks``; a failure names its run in the rank's traceback."""
    out = {}
    for name, (function, args) in runs.items():
        try:
            out[name] = function(rank, world_size, *args)
        except BaseException as error:
            error.add_note(f"in run {name!r}")
            raise
    return out


def mount_tmpfs(where: Path, size: str, read_only: bool = False):
    """A real tmpfs of ``size`` at ``where`` (made here), for disks that are full or read-only; a generator for
    a pytest fixture: skips where this user cannot mount (needs root), unmounts after."""
    where.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); needs root")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="module")
def s3():
    """A real S3 server on loopback for a module's object_store tests (tests/object_store.py), its environment
    set for the test process and the ranks it starts."""
    from tests import object_store
    with pytest.MonkeyPatch.context() as patch:
        server = object_store.serve(patch)
        yield server
        server.stop()


# -- trainers ----------------------------------------------------------------------------------------
# The small run the resume tests share: 50 classes (25/25 on 2 ranks, 17/17/16 on 3), 2 epochs with a
# warm-up, clipping on, and sampling (its RNG must resume too).
RESUMABLE = dict(classes=50, clip=5.0, sample_rate=0.5, epochs=2, warmup_epochs=0.5, samples=96)


def make_trainer(world_size, out_dir=None, stage=2, precision="fp32", *, classes, micro=8, accumulation=1,
                 clip=None, embedding=32, sample_rate=1.0, optimizer="sgd", epochs=None, warmup_epochs=None,
                 max_steps=None, samples=1000, data=None, every=None, keep_last=None, init_backbone=None,
                 extra_ds=None, storage="device", storage_dtype="float32"):
    """A real ``Trainer`` of an r_tiny backbone on this rank. ``None``: the run config's default (and no
    ``gradient_clipping`` in the DeepSpeed JSON); ``out_dir`` None: a fresh temporary directory; ``data``
    None: ``samples`` synthetic images an epoch; AdamW runs at lr 1e-3 (SGD's 0.1 would diverge)."""
    from ds_face.config import (
        BatchLayout, CheckpointConfig, DataConfig, HeadConfig, ModelConfig, OptimizerConfig, OutputConfig, RunConfig,
        ScheduleConfig,
    )
    from ds_face.training.trainer import Trainer
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
                    head=HeadConfig(num_classes=classes, sample_rate=sample_rate, storage=storage,
                                    storage_dtype=storage_dtype),
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


# -- the `slow` marker -------------------------------------------------------------------------------
# A test is `slow` when it starts processes: ranks (`run_ranks`), launches (`run_command`, the files' `launch`
# helpers), subprocesses, process pools. Each costs seconds of interpreter and torch start-up, and they are what
# fills the suite's 40 minutes; a unit test runs in this process. Decided by reading the code a test reaches --
# its function, its fixtures, and the project functions, classes and modules they name, followed down -- so a
# new test is marked by what it does, not by a list to keep. `pytest -m "not slow"` runs the unit tests.
PROCESS_STARTERS = (subprocess, multiprocessing, concurrent.futures.ProcessPoolExecutor, run_ranks, run_command,
                    os.fork, os.system, os.posix_spawn, os.execv, os.execve)
PROJECT_PACKAGES = ("ds_face", "data_prep", "tests")


def _in_project(obj) -> bool:
    name = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None) or ""
    return name.split(".")[0] in PROJECT_PACKAGES


def _names(code: types.CodeType) -> set[str]:
    """Every global and attribute name a function's code uses, its nested functions, lambdas and comprehensions
    included."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _named_by(function: types.FunctionType) -> list:
    """The objects a function's code can reach by name: its globals, closure cells and the modules it imports
    inside (``from tests.conftest import launch``), and the attributes of the modules among them
    (``subprocess.run``, ``conftest.launch``)."""
    names = _names(function.__code__)
    found = [function.__globals__[n] for n in names if n in function.__globals__]
    found += [_imported(n) for n in names if n in sys.modules or n.split(".")[0] in PROJECT_PACKAGES]
    found += [_contents(cell) for cell in function.__closure__ or ()]
    found += [vars(m).get(n) for m in found if isinstance(m, types.ModuleType) for n in names]  # no __getattr__
    return found


def _imported(module_name: str):
    """The module an import inside a function names; a project module not imported yet is imported now, as the
    test would import it (None if it is not a module, or does not import now: the test will say why)."""
    try:
        return importlib.import_module(module_name)
    except Exception:  # an attribute named like a package, or a module that fails to import
        return None


def _contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return None


def starts_processes(obj, seen: set[int] | None = None) -> bool:
    """Whether ``obj`` (a test, fixture or helper) is, or names, a process starter, directly or through the
    project's functions, classes, ``functools.partial``s and modules it names."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return False
    seen.add(id(obj))
    if any(obj is starter for starter in PROCESS_STARTERS):
        return True
    if isinstance(obj, functools.partial):
        return starts_processes(obj.func, seen)
    if isinstance(obj, (staticmethod, classmethod)):
        return starts_processes(obj.__func__, seen)
    if not _in_project(obj):
        return False
    if inspect.isclass(obj):
        return any(starts_processes(member, seen) for member in vars(obj).values())
    if inspect.isfunction(obj):
        return any(starts_processes(named, seen) for named in _named_by(obj))
    return False


def pytest_collection_modifyitems(items):
    verdicts = {}  # per test function and fixture, so that parametrized tests and shared fixtures are read once
    for item in items:
        fixtures = [defs[-1].func for defs in item._fixtureinfo.name2fixturedefs.values()]
        reached = [code for code in [getattr(item, "function", None), *fixtures] if code is not None]
        for code in reached:
            if code not in verdicts:
                verdicts[code] = starts_processes(code)
        if any(verdicts[code] for code in reached):
            item.add_marker(pytest.mark.slow)
