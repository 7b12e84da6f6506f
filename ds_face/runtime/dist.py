"""Collectives the Partial FC head needs, with the gradients it needs.

Everything here goes through ``torch.distributed`` on whatever process group
DeepSpeed set up (gloo on CPU, NCCL on GPU), so one code path serves both.
Gloo has no reduce-scatter, so the backward passes use all-reduce.
"""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist


TIMEOUT_ENV = "DS_FACE_TIMEOUT_MIN"  # minutes a collective may wait for a peer (30 unless set)


def collective_timeout() -> datetime.timedelta:
    """The process group's timeout: how long a rank waits in a collective for a peer before it fails (a dead
    node, a rank stuck in evaluation). ``DS_FACE_TIMEOUT_MIN`` minutes, 30 by default."""
    value = os.environ.get(TIMEOUT_ENV, "30")
    if not (value.isdigit() and 0 < int(value) <= 7 * 24 * 60):
        raise ValueError(f"{TIMEOUT_ENV}={value!r}: expected whole minutes in [1, 10080]")
    return datetime.timedelta(minutes=int(value))


def init(**kwargs) -> None:
    """``deepspeed.init_distributed(**kwargs)``, then drop the name of this rank's DeepSpeed CPU all-reduce buffer.

    On CPU with every rank on one host, DeepSpeed 0.19.8 creates a 66 MB shared-memory file per rank,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, and never unlinks it, so every run
    leaves RAM-backed files behind until the machine runs out of memory. Once every rank is past init (the
    barrier) each has mapped its peers' buffers, so the names can go: the mappings stay valid and the
    memory is freed when the last exits.
    """
    import deepspeed

    from ds_face.runtime.quiet import SHM_OP_LOADED, printing_without
    with printing_without(SHM_OP_LOADED):  # said by every rank at every start, though it only loads the op
        deepspeed.init_distributed(**kwargs)
    dist.barrier()
    env = os.environ
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_"
         f"{env.get('MASTER_PORT', '')}_{dist.get_rank()}").unlink(missing_ok=True)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's ``[B, ...]`` tensor into ``[W*B, ...]``.

    Backward: rank r's rows receive the sum of the gradients that every rank's
    head slice sent to them, times W. The factor W is there because DeepSpeed
    (like DDP) averages backbone gradients over ranks; the head loss is already
    the mean over the global batch, so without it the backbone would get 1/W of
    the true gradient. It is applied here, once, and nowhere else.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        ctx.world, ctx.rank, ctx.rows = world_size(), rank(), local.shape[0]
        if ctx.world == 1:
            return local.clone()
        parts = [torch.empty_like(local) for _ in range(ctx.world)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.world == 1:
            return grad
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows] * ctx.world


def all_gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    return _AllGather.apply(local)


def all_gather_no_grad(local: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=0)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; gradient passes through unchanged.

    Every rank computes the same scalar loss from the reduced value, so each
    rank's own addend receives exactly dLoss/dSum: the identity, not a sum.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        total = local.clone()
        if world_size() > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


def all_reduce_sum_with_grad(local: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(local)


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place max over ranks (no gradient: used for the softmax shift)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on at least one."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    all_reduce_max_(value)
    return bool(value.item() > 0)


def shutdown() -> None:
    """End of a run on every rank: wait for the others, then tear the process group down cleanly, so that no
    rank leaves while another still talks to it."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_without_teardown(code: int) -> None:
    """Leave the process once the work and its process group are done, without the interpreter's teardown:
    C++ threads of gloo / DeepSpeed destroyed there occasionally abort the process ("terminate called without
    an active exception", SIGABRT) on a loaded machine, turning a finished run into a failed one for the
    launcher. Logs and streams are flushed first."""
    import logging
    import sys
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
