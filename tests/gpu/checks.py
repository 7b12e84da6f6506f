"""The GPU checks, one function each: ``check_x(ctx) -> markdown`` raises AssertionError (or any error) when
the GPU path is wrong, and returns what it measured otherwise. ``python -m tests.gpu.check`` runs them all and
writes one report; ``tests/gpu/test_gpu.py`` runs each as a pytest test (marker ``gpu``).

Every rank is started through ``ds_face.runtime.spawn.run_ranks(..., backend=None)``: the accelerator's backend
(NCCL) with rank r on GPU r, as the benchmarks start theirs; the launch check goes through the ``deepspeed``
launcher and ``ds_face.train`` as users do. The parent process itself never touches a GPU (checked last).
The small correctness runs use the trainer the CPU tests use (``tests.conftest.make_trainer``: r_tiny).
"""
from __future__ import annotations

import functools
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ds_face.runtime.markdown import markdown_table
from ds_face.runtime.spawn import RankFailed, free_port, run_ranks
from tests import conftest, observe

ROOT = Path(__file__).resolve().parents[2]
LR = 0.1
CLASSES, EMBEDDING = 11, 32


class CheckFailed(AssertionError):
    """A check that failed after measuring something worth reporting: ``body`` goes into the report."""

    def __init__(self, message: str, body: str):
        super().__init__(message)
        self.body = body


@dataclass
class Context:
    """What every check is handed: the GPUs (= the world size), a scratch directory and the speed grid."""
    world_size: int
    workdir: Path
    classes: int = 1_000_000  # speed: the identities of the synthetic data (seed 003's 1M row)
    batch: int = 128  # speed: per GPU
    backbones: tuple[str, ...] = ("r50", "r100")
    precisions: tuple[str, ...] = ("fp16", "bf16")
    rates: tuple[float, ...] = (0.1, 1.0)
    bench_precisions: tuple[str, ...] = ("tf32", "fp16", "bf16")  # of `bench report`
    bench_backbone: str = "r50"  # of `bench report` and `bench memory --measure`
    memory_classes: str = "100000,1000000"  # the `bench memory --measure` grid: these x (model parallel, PFC 0.1)
    memory_precision: str = "fp16"
    warmup: int = 5
    steps: int = 20
    results: dict = field(default_factory=dict)  # what checks measured, for the report's summary

    def ranks(self, fn, *args, timeout: float = 600.0, env: dict | None = None) -> list:
        return run_ranks(self.world_size, fn, *args, timeout=timeout, backend=None, env=env)


def _trainer(world_size, out_dir, stage, precision, **kw):
    kw = {"classes": CLASSES, "embedding": EMBEDDING, "samples": 100_000, **kw}
    return conftest.make_trainer(world_size, out_dir, stage, precision, **kw)


def _on_device(tensor) -> bool:
    from deepspeed.accelerator import get_accelerator
    return str(tensor.device) == get_accelerator().current_device_name()


# -- 1. NCCL on every visible GPU ---------------------------------------------------------------------------
def _nccl_rank(rank, world_size):
    from deepspeed.accelerator import get_accelerator

    from ds_face.runtime.dist import all_gather_no_grad, all_gather_with_grad
    device = torch.device(get_accelerator().current_device_name())
    total = torch.full((4,), float(rank + 1), device=device)
    torch.distributed.all_reduce(total)
    gathered = all_gather_no_grad(torch.tensor([rank], device=device))
    x = torch.ones(2, 3, device=device, requires_grad=True)
    all_gather_with_grad(x).sum().backward()  # the head's all-gather: gradient W (all-reduce) x W
    return {"backend": torch.distributed.get_backend(), "device": str(device), "current": torch.cuda.current_device(),
            "name": torch.cuda.get_device_name(), "sum": total.cpu(), "gathered": gathered.cpu(), "grad": x.grad.cpu()}


def check_nccl(ctx: Context) -> str:
    W = ctx.world_size
    out = ctx.ranks(_nccl_rank)
    rows = []
    for rank, r in enumerate(out):
        assert r["backend"] == "nccl", f"rank {rank}: backend {r['backend']}, expected nccl"
        assert r["current"] == rank and r["device"] == f"cuda:{rank}", f"rank {rank} is on {r['device']}"
        assert torch.equal(r["sum"], torch.full((4,), W * (W + 1) / 2)), f"rank {rank}: all_reduce {r['sum']}"
        assert torch.equal(r["gathered"], torch.arange(W)), f"rank {rank}: all_gather {r['gathered']}"
        assert torch.equal(r["grad"], torch.full((2, 3), float(W * W))), f"rank {rank}: all-gather gradient"
        rows.append([rank, r["device"], r["name"], r["backend"]])
    return (f"World size {W} (every visible GPU); all_reduce, all_gather and the head's autograd all-gather "
            f"gave the exact sums on every rank.\n\n" + markdown_table(["rank", "device", "GPU", "backend"], rows))


# -- 2. the engine at ZeRO 0/2/3: fp16 with a forced overflow, bf16 ----------------------------------------
def _snapshot(trainer, stage):
    import deepspeed
    fc = trainer.engine.module.fc.weight
    with deepspeed.zero.GatheredParameters([fc], enabled=stage == 3):  # stage 3 partitions it
        backbone = fc.detach().float().cpu().clone()
    return {"head": trainer.head.weight.cpu().clone(),
            "momentum": trainer.head_optimizer.state["momentum_buffer"].cpu().clone(), "backbone": backbone}


def _engine_rank(rank, world_size, root, stage):
    from ds_face.data.arrow import normalize
    from ds_face.training.trainer import loss_scale, micro_step
    out = {}
    trainer = _trainer(world_size, Path(root) / f"fp16_z{stage}", stage, "fp16", micro=8)
    engine, head, head_opt = trainer.engine, trainer.head, trainer.head_optimizer
    out["on_device"] = (all(_on_device(p) for p in engine.module.parameters()) and _on_device(head.weight)
                        and _on_device(head_opt.state["momentum_buffer"]))
    out["dtype"] = str(next(engine.module.parameters()).dtype)
    batches = trainer.loader.micro_batches(0, trainer.total_samples)
    for _ in range(3):  # normal steps until one is applied (the first scale, 2^8, may overflow once)
        if micro_step(engine, head, head_opt, next(batches), LR).applied:
            break
    out["normal_applied"] = engine.was_step_applied()

    # an inf gradient at the embeddings on rank 0 only: every rank's engine and head skip, the scale halves
    before, scale_before = _snapshot(trainer, stage), loss_scale(engine)
    def poison_gradient(module, args, output):  # returns None: the output itself is left as it is
        if rank == 0:
            output.register_hook(lambda grad: grad * float("inf"))

    hook = engine.module.register_forward_hook(poison_gradient)
    result = micro_step(engine, head, head_opt, next(batches), LR)
    hook.remove()
    after = _snapshot(trainer, stage)
    out.update(overflow_applied=result.applied, engine_applied=engine.was_step_applied(), scale_before=scale_before,
               scale_after=loss_scale(engine), unchanged={k: torch.equal(before[k], after[k]) for k in before})

    # a NaN in the last rank's head gradient only: the engine steps, the head skips on every rank
    head_before = head.weight.clone()
    batch = next(batches)
    loss = head(engine(normalize(batch["image"].to(engine.device)).half()), batch["label"].to(engine.device))
    engine.backward(loss)
    if rank == world_size - 1:
        head.pending_rows()[0].weight.grad[0, 0] = float("nan")
    lr, scale = engine.get_lr()[0], loss_scale(engine)
    engine.step()
    out.update(head_nan_engine_applied=engine.was_step_applied(),
               head_nan_applied=head_opt.step(lr, scale, engine.was_step_applied()),
               head_nan_unchanged=torch.equal(head_before, head.weight))
    out["recovered"] = micro_step(engine, head, head_opt, next(batches), LR).applied
    del trainer, engine, head, head_opt, batches

    trainer = _trainer(world_size, Path(root) / f"bf16_z{stage}", stage, "bf16", micro=8)
    losses = [micro_step(trainer.engine, trainer.head, trainer.head_optimizer, batch, LR).loss.item()
              for _, batch in zip(range(12), trainer.loader.micro_batches(0, trainer.total_samples))]
    out.update(bf16_losses=losses, bf16_dtype=str(next(trainer.engine.module.parameters()).dtype),
               bf16_on_device=all(_on_device(p) for p in trainer.engine.module.parameters()))
    return out


def check_engine(ctx: Context) -> str:
    rows = []
    for stage in (0, 2, 3):
        for rank, r in enumerate(ctx.ranks(_engine_rank, str(ctx.workdir / "engine"), stage)):
            where = f"ZeRO {stage}, rank {rank}"
            assert r["on_device"] and r["dtype"] == "torch.float16", f"{where}: fp16 weights not on the rank's GPU"
            assert r["normal_applied"], f"{where}: no fp16 step was applied in 3"
            assert not r["engine_applied"] and not r["overflow_applied"], f"{where}: the overflow step was applied"
            assert r["scale_after"] == r["scale_before"] / 2, f"{where}: loss scale {r['scale_before']} -> {r['scale_after']}"
            assert all(r["unchanged"].values()), f"{where}: changed by a skipped step: {r['unchanged']}"
            assert r["head_nan_engine_applied"] and not r["head_nan_applied"] and r["head_nan_unchanged"], \
                f"{where}: a NaN in one rank's head gradient did not skip the head everywhere"
            assert r["recovered"], f"{where}: the step after the skips was not applied"
            losses = torch.tensor(r["bf16_losses"])
            assert r["bf16_dtype"] == "torch.bfloat16" and r["bf16_on_device"], f"{where}: bf16 weights"
            assert torch.isfinite(losses).all() and losses[-3:].mean() < losses[:3].mean(), \
                f"{where}: bf16 did not train: {r['bf16_losses']}"
            if rank == 0:
                rows.append([stage, f"{r['scale_before']:g} -> {r['scale_after']:g}", "skipped, unchanged",
                             "head skipped on every rank", f"{losses[:3].mean():.3f} -> {losses[-3:].mean():.3f}"])
    return ("r_tiny, 11 classes, micro-batch 8 per GPU (`tests.conftest.make_trainer`), driven by "
            "`ds_face.training.trainer.micro_step`. fp16: an inf gradient injected at rank 0's embeddings; then a NaN in the "
            "last rank's head gradient only. bf16: 12 steps.\n\n"
            + markdown_table(["ZeRO", "fp16 loss scale at the overflow", "backbone, head, momentum",
                              "NaN in one head gradient", "bf16 loss, first 3 -> last 3 steps"], rows))


# -- 3. the Partial FC head on the GPU against a CPU reference -------------------------------------------
HEAD_DIM, HEAD_PER_RANK, HEAD_CLASSES = 16, 4, 23


def _head_problem(world_size):
    gen = torch.Generator().manual_seed(0)
    n = world_size * HEAD_PER_RANK
    return (torch.randn(n, HEAD_DIM, generator=gen), torch.randint(0, HEAD_CLASSES, (n,), generator=gen),
            torch.randn(HEAD_CLASSES, HEAD_DIM, generator=gen) * 0.1)


def _head_rank(rank, world_size, rate):
    from deepspeed.accelerator import get_accelerator

    from ds_face.head import HeadOptimizer, Margin, PartialFC
    device = get_accelerator().current_device_name()
    embeddings, labels, weight = _head_problem(world_size)
    head = PartialFC(HEAD_DIM, HEAD_CLASSES, rate, Margin.arcface(), device=device, seed=1)
    head.weight.copy_(weight[head.class_start:head.class_start + head.num_local].to(device))
    optimizer = HeadOptimizer(head, "sgd", momentum=0.9, weight_decay=5e-4)
    mine = slice(rank * HEAD_PER_RANK, (rank + 1) * HEAD_PER_RANK)
    local = embeddings[mine].to(device).requires_grad_(True)
    loss = head(local, labels[mine].to(device))
    loss.backward()
    rows = head.pending_rows()[0].index
    grad = head.pending_rows()[0].weight.grad.clone()
    assert optimizer.step(LR)
    return {"loss": loss.detach().cpu(), "emb_grad": local.grad.cpu(), "rows": None if rows is None else rows.cpu(),
            "weight_grad": grad.cpu(), "weight": head.weight.cpu(), "start": head.class_start, "count": head.num_local,
            "on_device": _on_device(head.weight) and (rows is None or _on_device(rows))}


def _head_reference(world_size):
    """Single-process fp64 on the CPU: the full softmax with the same margin, and one torch SGD step."""
    import torch.nn.functional as F

    from ds_face.head import Margin
    from ds_face.head.partial_fc import LOSS_CAP
    embeddings, labels, weight = (t.double() if t.is_floating_point() else t for t in _head_problem(world_size))
    embeddings.requires_grad_(True)
    w = torch.nn.Parameter(weight.clone())
    cos = F.linear(F.normalize(embeddings), F.normalize(w)).clamp(-1, 1)
    per_sample = F.cross_entropy(Margin.arcface().logits(cos, torch.arange(len(labels)), labels), labels,
                                 reduction="none")
    per_sample.mean().backward()  # the true gradient; the value compared is the one reported (capped)
    loss = per_sample.detach().clamp_max(LOSS_CAP).mean()
    grad = w.grad.clone()
    sgd = torch.optim.SGD([w], lr=LR, momentum=0.9, weight_decay=5e-4)
    sgd.step()
    return loss.detach(), embeddings.grad, grad, w.detach(), labels


def check_head(ctx: Context) -> str:
    from ds_face.head.sampling import active_classes
    W = ctx.world_size
    ref_loss, ref_emb_grad, ref_grad, ref_weight, labels = _head_reference(W)
    lines = []
    for rate in (1.0, 0.5):
        worst = 0.0
        for rank, r in enumerate(ctx.ranks(_head_rank, rate)):
            assert r["on_device"], f"rank {rank}: head weight or sampler not on the rank's GPU"
            start, count = r["start"], r["count"]
            if rate == 1.0:
                assert r["rows"] is None, "sample rate 1.0 uses every centre"
                mine = slice(rank * HEAD_PER_RANK, (rank + 1) * HEAD_PER_RANK)
                diffs = [(r["loss"].double() - ref_loss).abs().max(),
                         (r["emb_grad"].double() / W - ref_emb_grad[mine]).abs().max(),
                         (r["weight_grad"].double() - ref_grad[start:start + count]).abs().max(),
                         (r["weight"].double() - ref_weight[start:start + count]).abs().max()]
                worst = max([worst] + [float(d) for d in diffs])
            else:  # the sampled softmax is another function: which rows it used is checked
                positives = {int(c) - start for c in labels if start <= int(c) < start + count}
                assert positives <= set(r["rows"].tolist()), f"rank {rank}: a positive class was not sampled"
                on_cpu = active_classes(1, 0, HEAD_CLASSES, rate, labels, start, count)
                assert torch.equal(r["rows"], on_cpu), f"rank {rank}: the GPU drew other centres than the CPU"
        if rate == 1.0:
            assert worst < 1e-4, f"sample rate 1.0: GPU head vs fp64 CPU reference differs by {worst:.3g}"
            lines.append(f"- sample rate 1.0: loss, embedding gradients, weight gradients and the weights after one "
                         f"SGD step equal the fp64 CPU reference within {worst:.2g} (tolerance 1e-4)")
        else:
            lines.append("- sample rate 0.5: on every rank every positive class was sampled, and the rows drawn on "
                         "the GPU are the ones the CPU draws (`ds_face.head.sampling`: integer hashing, the same on "
                         "every device)")
    return f"{HEAD_CLASSES} classes over {W} GPU(s), embedding {HEAD_DIM}, {HEAD_PER_RANK} samples per GPU, ArcFace.\n\n" \
        + "\n".join(lines)


# -- head storage: host and disk against device on the same GPU ---------------------------------------------
STORAGE_CLASSES, STORAGE_ROWS, STORAGE_BATCH = 2_000_000, 100_000, 128  # per rank: rows used per step


def _storage_rank(rank, world_size, storage, directory, classes, rows, batch):
    """Peak device memory and median step time of the head alone (forward, backward, sparse SGD step) with its
    state in ``storage``; and the first steps' losses, to compare the storages."""
    from deepspeed.accelerator import get_accelerator

    from ds_face.head import HeadOptimizer, Margin, PartialFC
    acc = get_accelerator()
    device = acc.current_device_name()
    head = PartialFC(512, classes, 1.0, Margin.arcface(), device=device, seed=1, storage=storage,
                     storage_dir=directory)
    head.sample_rate = min(1.0, rows / head.num_local)  # the same rows used whatever the storage
    optimizer = HeadOptimizer(head, "sgd")
    gen = torch.Generator().manual_seed(rank)
    acc.synchronize()
    acc.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(12):
        embeddings = torch.randn(batch, 512, generator=gen).to(device).requires_grad_(True)
        labels = torch.randint(0, classes, (batch,), generator=gen).to(device)
        acc.synchronize()
        started = time.perf_counter()
        head.set_position(step)
        loss = head(embeddings, labels)
        loss.backward()
        optimizer.step(0.1)
        acc.synchronize()
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    return {"peak": acc.max_memory_allocated(), "step": statistics.median(times[2:]), "losses": losses}


def check_head_storage(ctx: Context) -> str:
    sizes = (STORAGE_CLASSES, STORAGE_ROWS, STORAGE_BATCH)
    results = {s: ctx.ranks(_storage_rank, s, str(ctx.workdir / "head_storage"), *sizes)
               for s in ("device", "host", "disk")}
    rows = []
    for storage, ranks in results.items():
        peak = max(r["peak"] for r in ranks) / 2**20
        step = statistics.median([r["step"] for r in ranks]) * 1e3
        base = statistics.median([r["step"] for r in results["device"]]) * 1e3
        rows.append([storage, f"{peak:,.0f}", f"{step:.1f}", f"{step / base:.2f}"])
        same = all(r["losses"] == d["losses"] for r, d in zip(ranks, results["device"]))
        assert same or storage == "device", f"{storage} storage: other losses than device storage on the GPU"
    return (f"The head alone, {STORAGE_CLASSES:,} classes over {ctx.world_size} GPU(s), embedding 512, "
            f"{STORAGE_ROWS:,} rows used per rank per step, {STORAGE_BATCH} samples per GPU, SGD, fp32 storage; "
            f"12 steps, the median of the last 10. The losses of host and disk storage equal device storage's.\n\n"
            + markdown_table(["storage", "peak device MiB (max over ranks)", "step ms", "time vs device"], rows))


# -- 4. exact resume after a save on the GPU ----------------------------------------------------------------
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # cuBLAS's condition for deterministic results


def _state(trainer, stage, gather_optimizer):
    """The run's state on this rank: the module's weights and buffers (gathered at stage 3), the head and its
    momentum, the loss scale, the position; with ``gather_optimizer`` also the backbone's fp32 master weights and
    momentum (collective; DeepSpeed links them to the parameters at the first step after a load)."""
    import deepspeed

    from ds_face.training.trainer import loss_scale
    from tests.engine_state import gathered_state
    module = trainer.engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), enabled=stage == 3):
        weights = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {"module": weights, "scale": loss_scale(trainer.engine), "head": trainer.head.weight.cpu().clone(),
            "momentum": trainer.head_optimizer.state["momentum_buffer"].cpu().clone(),
            "position": (trainer.position.step, trainer.position.samples),
            "params": gathered_state(trainer.engine)["params"] if gather_optimizer else {}}


def _same(a, b) -> bool:
    return (a["scale"] == b["scale"] and a["position"] == b["position"] and torch.equal(a["head"], b["head"])
            and torch.equal(a["momentum"], b["momentum"]) and a["module"].keys() == b["module"].keys()
            and all(torch.equal(v, b["module"][k]) for k, v in a["module"].items())
            and a["params"].keys() == b["params"].keys()
            and all(torch.equal(v, b["params"][n][k]) for n, e in a["params"].items() for k, v in e.items()))


def _resume_rank(rank, world_size, root, stage, precision):
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    make = functools.partial(_trainer, world_size, stage=stage, precision=precision,
                             **{**conftest.RESUMABLE, "samples": 24 * world_size}, every=2, keep_last=2)
    whole = make(Path(root) / "whole")
    whole_steps = observe.fit(whole)  # 6 steps, 2 epochs
    first = make(Path(root) / "cut", max_steps=4)
    first.fit()  # saves step 4, mid-epoch 1
    saved = _state(first, stage, gather_optimizer=False)
    second = make(Path(root) / "cut")
    second.resume()
    restored = _state(second, stage, gather_optimizer=False)
    second_steps = observe.fit(second)
    return {"restored_exactly": _same(saved, restored), "whole": whole_steps.losses, "second": second_steps.losses,
            "final_same": _same(_state(whole, stage, True), _state(second, stage, True)), "scale": restored["scale"]}


def check_resume(ctx: Context) -> str:
    rows = []
    for stage, precision in ((2, "fp16"), (3, "bf16")):
        out = ctx.ranks(_resume_rank, str(ctx.workdir / f"resume_z{stage}_{precision}"), stage, precision,
                        env=DETERMINISTIC_ENV)
        for rank, r in enumerate(out):
            where = f"ZeRO {stage} {precision}, rank {rank}"
            assert r["restored_exactly"], f"{where}: the resumed state differs from the saved one"
            assert len(r["whole"]) == 6 and len(r["second"]) == 2
            worst = max(abs(a - b) for a, b in zip(r["second"], r["whole"][4:]))
            assert worst <= 1e-3 * max(abs(x) for x in r["whole"][4:]), f"{where}: losses after the resume {r['second']} " \
                f"vs uninterrupted {r['whole'][4:]}"
        r = out[0]
        rows.append([f"ZeRO {stage}, {precision}", "bit for bit", f"{r['scale']:g}",
                     "bit for bit" if r["second"] == r["whole"][4:] else
                     f"within {max(abs(a - b) for a, b in zip(r['second'], r['whole'][4:])):.2g}",
                     "bit for bit" if r["final_same"] else "differs (GPU kernels' order)"])
    return ("6 steps uninterrupted vs 4 steps, save (step 4, mid-epoch), a fresh trainer resuming and finishing, "
            "on the same GPUs; deterministic algorithms requested (`torch.use_deterministic_algorithms`, warn only). "
            "Required: the restored state (the backbone's weights and BatchNorm buffers, loss scale, head and its "
            "momentum, position) equals the saved one bit for bit; the losses after it within 1e-3 relative. "
            "Reported: the final state (also the gathered fp32 master weights and momentum) against the "
            "uninterrupted run's.\n\n"
            + markdown_table(["run", "restored state", "loss scale", "losses of steps 5-6 vs uninterrupted",
                              "final state vs uninterrupted"], rows))


# -- 5. export from a GPU checkpoint; ONNX parity ----------------------------------------------------------
def _save_rank(rank, world_size, out_dir):
    from tests.engine_state import gathered_state
    trainer = _trainer(world_size, out_dir, 2, "fp16", micro=8, max_steps=2)
    trainer.fit()  # 2 steps, then the trainer's own save
    params = gathered_state(trainer.engine)["params"]
    return {name: entry["fp32"] for name, entry in params.items()}


def _onnx_parity_rank(rank, world_size, model_pt, onnx_path):
    import numpy as np
    import onnxruntime
    from deepspeed.accelerator import get_accelerator

    from ds_face.backbones import get_backbone
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 on both sides
    device = get_accelerator().current_device_name()
    model = get_backbone("r_tiny", EMBEDDING)
    model.load_state_dict(torch.load(model_pt, weights_only=True))
    model = model.to(device).eval()
    wanted = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else []
    session = onnxruntime.InferenceSession(str(onnx_path), providers=wanted + ["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    diffs = {}
    for size in (4, 3):
        images = torch.rand(size, 3, 112, 112, generator=gen) * 2 - 1
        with torch.no_grad():
            expected = model(images.to(device)).cpu().numpy()
        got = session.run(["embedding"], {"input": images.numpy()})[0]
        diffs[size] = float(np.abs(got - expected).max())
    return {"providers": session.get_providers(), "diffs": diffs, "device": device}


def check_export(ctx: Context) -> str:
    import contextlib
    import io

    from ds_face.export import cli as export
    out_dir = ctx.workdir / "export_run"
    engine = ctx.ranks(_save_rank, str(out_dir))[0]
    model_pt, onnx_path = ctx.workdir / "model.pt", ctx.workdir / "model.onnx"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):  # export reads on the CPU
        code = export.main([str(out_dir / "checkpoints"), "--out", str(model_pt), "--onnx", str(onnx_path),
                            "--overwrite"])
    assert code == 0, f"ds_face.export.cli exit {code}: {stderr.getvalue().strip().splitlines()[-1:]}"
    state = torch.load(model_pt, weights_only=True)
    for name, value in engine.items():
        assert torch.equal(state[name], value.to(state[name].dtype)), f"model.pt {name} is not the engine's fp32 weight"
    cpu = {int(b): float(d) for b, d in re.findall(r"batch (\d+): ([0-9.e+-]+)", stdout.getvalue())}
    gpu = run_ranks(1, _onnx_parity_rank, str(model_pt), str(onnx_path), backend=None, timeout=600)[0]
    worst = max(gpu["diffs"].values())
    assert worst < 1e-3, f"onnxruntime ({gpu['providers'][0]}) vs torch on {gpu['device']}: {gpu['diffs']}"
    return (f"A 2-step ZeRO-2 fp16 run on {ctx.world_size} GPU(s) saved by the trainer; `python -m ds_face.export "
            f"--out model.pt --onnx model.onnx` on it: exit 0; `model.pt` equals the engine's gathered fp32 master "
            f"weights exactly.\n\n"
            f"- ONNX vs torch on the CPU (export's own check, tolerance 1e-4): "
            + ", ".join(f"batch {b}: {d:.3g}" for b, d in cpu.items())
            + f"\n- ONNX on onnxruntime {gpu['providers'][0]} vs torch on {gpu['device']} (TF32 off; tolerance 1e-3): "
            + ", ".join(f"batch {b}: {d:.3g}" for b, d in gpu["diffs"].items()))


# -- 6. a real launch, as users launch ----------------------------------------------------------------------
def check_launch(ctx: Context) -> str:
    out_dir = ctx.workdir / "launch"
    ds_json = ROOT / "ds_configs" / "zero2_fp16.json"
    cmd = [conftest.DEEPSPEED, "--num_gpus", str(ctx.world_size), "--master_port", str(free_port()), "--module",
           "ds_face.train", "--config", str(ROOT / "configs" / "cpu_demo.yaml"), "--deepspeed_config", str(ds_json),
           "--set", f"output.dir={out_dir}", "--set", "schedule.max_steps=30", "--set", "output.log_every=10",
           "--set", f"data.num_samples={128 * ctx.world_size * 30}"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the launch exited {proc.returncode}:\n" + "\n".join(text.splitlines()[-15:])
    speeds = re.findall(r"Speed ([0-9.]+) samples/sec.*Global Step: (\d+)", text)
    assert speeds and (out_dir / "checkpoints" / "latest").is_file(), "no progress line or no checkpoint"
    assert "Setting accelerator to CPU" not in text, "DeepSpeed fell back to the CPU"
    return (f"`deepspeed --num_gpus {ctx.world_size} --module ds_face.train --config configs/cpu_demo.yaml "
            f"--deepspeed_config ds_configs/zero2_fp16.json` (r_tiny, 4,000 classes, Partial FC 0.1, micro-batch "
            f"128), 30 steps: exit 0 in {seconds:.0f} s, a checkpoint written. Progress lines: "
            + ", ".join(f"step {s}: {float(v):,.0f} samples/s" for v, s in speeds))


# -- 7. training speed against a plain PyTorch loop; peak memory against the estimator ----------------------
def speed_rows(results: list[tuple[str, str, float, dict]], world_size: int, batch: int) -> list[list]:
    rows = []
    for backbone, precision, rate, r in results:
        if "error" in r:  # e.g. out of memory on a small GPU: the row says so, the check fails
            rows.append([backbone, precision, "Model parallel" if rate >= 1 else f"Partial FC {rate:g}",
                         f"{batch} x {world_size}", f"failed: {r['error']}"] + ["-"] * 5)
            continue
        rows.append([backbone, precision, "Model parallel" if rate >= 1 else f"Partial FC {rate:g}",
                     f"{batch} x {world_size}", f"{r['ds_face']['samples_per_s']:,.0f}",
                     f"{r['plain']['samples_per_s']:,.0f}", f"**{r['ratio']:.2f}**",
                     f"{max(r['ds_face']['peak_mib_by_rank']):,.0f}", f"{r['estimate_mib']:,.0f}",
                     f"{max(r['plain']['peak_mib_by_rank']):,.0f}"])
    return rows


SPEED_HEADER = ["backbone", "precision", "head", "batch", "ds_face samples/s", "plain loop samples/s",
                "ds_face / plain", "ds_face peak MiB/GPU", "estimator MiB", "plain peak MiB/GPU"]


def check_speed(ctx: Context) -> str:
    from ds_face.bench.cells import Setting
    from tests.gpu.speed import measure_pair
    results = []
    for backbone in ctx.backbones:
        for precision in ctx.precisions:
            for rate in ctx.rates:
                setting = Setting(backbone=backbone, embedding=512, world_size=ctx.world_size,
                                  micro_batch=ctx.batch, precision=precision, steps=ctx.steps,
                                  warmup=ctx.warmup, clipping=5.0)
                try:
                    result = measure_pair(setting, ctx.classes, rate)
                except RankFailed as failed:  # the first failed rank's last line; the other cells still run
                    rank, text = min(failed.errors.items())
                    result = {"error": f"rank {rank}: {(text.strip().splitlines() or ['?'])[-1]}"}
                results.append((backbone, precision, rate, result))
    ctx.results["speed"] = results
    text = speed_text(results, ctx)
    failed = [f"{b} {p} rate {r:g}" for b, p, r, result in results if "error" in result]
    if failed:
        raise CheckFailed(f"{len(failed)} speed cell(s) failed: {', '.join(failed)}", text)
    return text


def speed_text(results, ctx: Context) -> str:
    device = next((r["device"] for _, _, _, r in results if "device" in r), "-")
    return (f"{ctx.classes:,} classes, embedding 512, synthetic batches staged on the device before timing, "
            f"{ctx.warmup} warm-up + {ctx.steps} timed steps per loop, both loops in the same processes on the same "
            f"batches ({device} on rank 0), gradient clipping 5, SGD, cudnn.benchmark on in both (arcface_torch sets "
            f"it; `ds_face.train` does not). ds_face: the "
            f"DeepSpeed engine at ZeRO 0 + Partial FC (`ds_face.training.trainer.micro_step`, the `bench speed` cell); plain: "
            f"arcface_torch train_v2.py's loop (DDP, torch.autocast, GradScaler for fp16) around the same head "
            f"maths (`tests/gpu/speed.py`). samples/s: global batch / the slowest rank's mean step. Peak: "
            f"allocated memory above the rank's baseline, the largest rank; estimator: "
            f"`ds_face/bench/estimator.py` for the same cell (no overhead, leaf-module activations).\n\n"
            + markdown_table(SPEED_HEADER, speed_rows(results, ctx.world_size, ctx.batch)))


# -- 8. the benchmark commands ------------------------------------------------------------------------------
def _bench(*args: str, timeout: float = 900.0) -> str:
    proc = subprocess.run([sys.executable, "-m", "ds_face.bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"python -m ds_face.bench {' '.join(args)}: exit {proc.returncode}\n" \
        + "\n".join(proc.stderr.strip().splitlines()[-10:])
    return proc.stdout


def check_bench(ctx: Context) -> str:
    W = ctx.world_size
    report_md = ctx.workdir / "bench-report.md"
    report_args = ["report", "--out", str(report_md), "--overwrite", "--no-plot", "--backbone", ctx.bench_backbone,
                   "--classes", str(ctx.classes), "--world-size", str(W), "--batch-sizes", str(ctx.batch),
                   "--precisions", ",".join(ctx.bench_precisions), "--steps", "5", "--warmup", "2"]
    _bench(*report_args)
    memory_args = ["memory", "--backbone", ctx.bench_backbone, "--world-size", str(W), "--micro-batch", str(ctx.batch),
                   "--precision", ctx.memory_precision, "--classes", ctx.memory_classes,
                   "--cells", "Model parallel,Partial FC 0.1",
                   "--overhead-mb", "0", "--measure", "--steps", "2", "--warmup", "1"]
    memory_out = _bench(*memory_args)
    report_text = report_md.read_text()
    assert "~" in report_text, "the bench report measured nothing"
    body = "\n".join("##" + line if line.startswith("#") else line for line in report_text.splitlines())
    return (f"`python -m ds_face.bench {' '.join(a if '/' not in a else Path(a).name for a in report_args)}`:\n\n"
            f"{body}\n\n`python -m ds_face.bench {' '.join(memory_args)}`:\n\n```\n{memory_out.strip()}\n```")


# -- 9. the parent process --------------------------------------------------------------------------------
def check_parent(ctx: Context) -> str:
    assert not torch.cuda.is_initialized(), "the parent process initialised CUDA (a context on GPU 0 beside rank 0's)"
    return "After every check: `torch.cuda.is_initialized()` is False in the process that started the ranks."


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    run: object  # (Context) -> markdown


CHECKS = [
    Check("nccl", "NCCL process group on every visible GPU", check_nccl),
    Check("engine", "DeepSpeed engine at ZeRO 0/2/3: fp16 dynamic loss scaling with a forced overflow; bf16",
          check_engine),
    Check("head", "Partial FC head on the GPU against an fp64 CPU reference", check_head),
    Check("head_storage", "Head state in host memory and on disk against device storage: peak device memory, "
                          "step time, the same losses", check_head_storage),
    Check("resume", "Exact resume after a save on the GPU", check_resume),
    Check("export", "Export from a GPU checkpoint; ONNX parity with onnxruntime (CUDA EP if installed)",
          check_export),
    Check("launch", "A real `deepspeed` launch of ds_face.train on every GPU", check_launch),
    Check("speed", "Training speed vs a plain PyTorch loop (arcface_torch train_v2.py's shape); peak memory vs "
                   "the estimator", check_speed),
    Check("bench", "`python -m ds_face.bench report` and `bench memory --measure` on the GPUs", check_bench),
    Check("parent", "The parent process holds no CUDA context", check_parent),
]
BY_NAME = {c.name: c for c in CHECKS}
