"""Which class centres a micro-step uses, and the centres' initial values: functions of the run's seed and
position over the *global* class space, so any world size draws the same centres (DESIGN.md invariant 8), and
each rank's cost grows with the rows it uses, not with the classes it owns.

The classes are cut into fixed blocks of ``BLOCK`` classes (the last one shorter), whatever the world size.
In block ``b`` of ``size`` classes holding ``p`` of the micro-step's positive classes, the step uses the ``p``
positives and the first ``max(floor(rate * size) - p, 0)`` distinct non-positive classes of the block's draw
sequence ``draw(j) = start + hash(seed, position, b, j) mod size`` (j = 0, 1, 2, ...; splitmix64's finaliser,
the same integers on every device). A rank evaluates only the blocks that overlap its class range and keeps
the classes in it: O(rows used) work per step (about ``-ln(1 - rate)/rate`` draws per row used: 1.05 at rate
0.1, 1.4 at 0.5), with no ``[num_local]`` vector anywhere.

arcface_torch instead draws ``floor(rate * num_local)`` centres per rank (``torch.rand(num_local)`` and a
top-k): the same rate, but another set for every world size, and O(classes per rank) per step.
"""
from __future__ import annotations

import math

import torch

from ds_face.data.seeds import GOLDEN, MIX1, MIX2, init_seed

BLOCK = 1 << 16  # classes per sampling/initialisation block: fixed, so that the draws ignore the world size
_U64 = 1 << 64


def _signed(value: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    value &= _U64 - 1
    return value - _U64 if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` on int64 copies the sign bit)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hash64(seed: int, position: int, keys: torch.Tensor) -> torch.Tensor:
    """splitmix64(seed * GOLDEN + position * MIX1 + key * MIX2) per key, as int64 bit patterns; the same bits as
    ``ds_face.data.seeds.splitmix64(mix(seed, position, keys))`` (int64 products wrap mod 2**64)."""
    x = keys * _signed(MIX2) + _signed(int(seed) * GOLDEN + int(position) * MIX1)
    x = (x ^ _shift_right(x, 30)) * _signed(MIX1)
    x = (x ^ _shift_right(x, 27)) * _signed(MIX2)
    return x ^ _shift_right(x, 31)


def _blocks(num_classes: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First class and size of every block overlapping classes [start, start + count)."""
    first, last = start // BLOCK, (start + count - 1) // BLOCK
    starts = torch.arange(first, last + 1, dtype=torch.int64) * BLOCK
    return starts, torch.clamp(num_classes - starts, max=BLOCK)


def _draws_needed(size: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Draws (with repeats) that usually yield ``target`` distinct values of ``size``: the coupon collector's
    mean ``size * ln(size / (size - target))`` with a margin; blocks that fall short draw again, twice as long."""
    free = (size - target).clamp_min(1).double()
    mean = size.double() * torch.log(size.double() / free)
    return (mean * 1.25 + 64).ceil().long()


def active_classes(seed: int, position: int, num_classes: int, rate: float, positives: torch.Tensor,
                   start: int, count: int) -> torch.Tensor:
    """Sorted local row ids (class - start) of the classes in [start, start + count) that the micro-step at
    ``position`` uses: every positive class there plus the block draws above (``positives``: the global
    micro-batch's labels, any order, repeats allowed)."""
    device = positives.device
    positives = torch.unique(positives.long())
    block_start, block_size = (t.to(device) for t in _blocks(num_classes, start, count))
    block_id = block_start // BLOCK
    in_block = torch.bucketize(positives, block_start, right=True) - 1
    held = (in_block >= 0) & (in_block < block_start.numel())
    held &= positives < (block_start + block_size)[in_block.clamp(0, block_start.numel() - 1)]
    held_count = torch.bincount(in_block[held], minlength=block_start.numel())
    wanted = torch.floor(block_size.double() * rate).long()
    need = (wanted - held_count).clamp_min(0)
    drawn = torch.empty(0, dtype=torch.int64, device=device)
    todo = torch.nonzero(need > 0).squeeze(1)
    draws = _draws_needed(block_size, (need + held_count).clamp_max(block_size - 1))
    while todo.numel():
        picked, short = _first_distinct(seed, position, block_id[todo], block_start[todo], block_size[todo],
                                        need[todo], draws[todo], positives)
        drawn = torch.cat([drawn, picked])
        todo, draws = todo[short], draws.clone()
        draws[todo] *= 2
    chosen = torch.cat([positives, drawn])
    chosen = chosen[(chosen >= start) & (chosen < start + count)] - start
    return chosen.sort().values


def _first_distinct(seed, position, block_id, block_start, block_size, need, draws, positives):
    """The first ``need[i]`` distinct non-positive classes of block i's draw sequence, for blocks with enough
    of them in their first ``draws[i]`` draws; and which blocks (indices into the arguments) fell short."""
    device = block_id.device
    owner = torch.repeat_interleave(torch.arange(block_id.numel(), device=device), draws)
    offset = torch.cumsum(draws, 0) - draws
    j = torch.arange(owner.numel(), device=device) - offset[owner]
    value = hash64(seed, position, block_id[owner] * (1 << 32) + j) & ((1 << 62) - 1)
    cls = block_start[owner] + value % block_size[owner]
    # keep each class's first draw (a stable sort keeps draw order among equals), never a positive
    order = torch.sort(cls, stable=True).indices
    ordered = cls[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    keep = torch.zeros_like(first)
    keep[order] = first & ~torch.isin(ordered, positives)
    # the first need[i] kept draws of each block, in draw order
    kept_before = torch.cumsum(keep.long(), 0)
    rank_in_block = kept_before - (kept_before - keep.long())[offset][owner]
    total = torch.zeros_like(need).index_add_(0, owner, keep.long())
    enough = total >= need
    take = keep & (rank_in_block <= need[owner]) & enough[owner]
    return cls[take], torch.nonzero(~enough).squeeze(1)


def initial_rows(seed: int, num_classes: int, embedding_size: int, start: int, count: int, write) -> None:
    """The centres' N(0, 0.01) initial values (arcface_torch's init) of classes [start, start + count), one block
    at a time: each block's values come from its own seeded generator, so a class starts from the same centre
    on any world size, and no more than one block is ever held in memory. ``write(row, values)`` stores rows
    ``row .. row + len(values)`` of the slice."""
    starts, sizes = _blocks(num_classes, start, count)
    for block_start, size in zip(starts.tolist(), sizes.tolist()):
        generator = torch.Generator().manual_seed(init_seed(seed, block_start // BLOCK))
        values = torch.normal(0.0, 0.01, (size, embedding_size), generator=generator)
        lo, hi = max(start, block_start), min(start + count, block_start + size)
        write(lo - start, values[lo - block_start:hi - block_start])


def mean_rows_used(rate: float, num_local: int) -> int:
    """About how many rows a rank uses per micro-step at ``rate`` (positives aside): for estimates and logs."""
    return num_local if rate >= 1.0 else int(math.floor(rate * num_local))
