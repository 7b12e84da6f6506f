"""The order in which a run sees its samples: one global sequence, whatever the number of ranks.

A run is one stream of samples: epoch 0's N samples in a seeded order, then epoch 1's, ... Optimizer steps
cut it into consecutive global batches of G = micro-batch x accumulation x world size samples, and each
global batch into G / B micro-batches of B samples ("slots"). Slot ``k = micro_step * world_size + rank``
goes to that rank at that micro-step. So:

* the position of a run is ONE integer, the samples seen so far; a checkpoint stores it, and a resume on any
  world size, accumulation or micro-batch continues at the next sample: every sample of an epoch is trained
  exactly once, across any number of resizes;
* with the global batch kept (e.g. 2 ranks x 1 micro-step -> 1 rank x 2 micro-steps), every micro-batch
  holds the same samples as before the resize, so the run's losses continue as if nothing happened;
* an epoch's end falls inside a global batch when G does not divide N: that batch takes the last samples of
  epoch e and the first of epoch e + 1 (nothing is dropped there). Only the run's last < G samples, which
  do not fill a step, are never trained (`Run.dropped`).

The order of one epoch, computed from integers alone (no data is read to know it):

1. the shards are permuted (seeded by seed and epoch);
2. they are dealt to ``streams`` logical streams, round robin; a stream reads its shards one after the
   other, each shard's rows in a seeded permutation (a shuffle as wide as a shard);
3. the streams are interleaved sample by sample (round robin, skipping a stream that ran out), so every
   micro-batch mixes ``streams`` shards: even a dataset converted in source order (sorted by identity)
   gives micro-batches of many identities.

The result is a permutation of the epoch's samples (`EpochOrder.rows`), with locality: at any time the
whole run reads from about ``streams`` shards.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ds_face.data.seeds import rng


class EpochOrder:
    """Sample ``p`` (0 <= p < N) of epoch ``epoch`` -> its dataset row (0 <= row < N, rows counted through
    the shards in manifest order). Deterministic in (seed, epoch, shard sizes, streams)."""

    def __init__(self, shard_rows: list[int], streams: int, seed: int, epoch: int):
        self.shard_rows = np.asarray(shard_rows, dtype=np.int64)
        self.shard_start = np.concatenate([[0], np.cumsum(self.shard_rows)[:-1]])
        self.num_samples = int(self.shard_rows.sum())
        self.seed, self.epoch = seed, epoch
        num_streams = max(1, min(streams, len(shard_rows)))
        shard_order = rng(seed, epoch, 0x5EED).permutation(len(shard_rows))
        # stream j: shards shard_order[j], shard_order[j + S], ...; its length and each shard's start in it
        self.stream_shards = [shard_order[j::num_streams] for j in range(num_streams)]
        self.stream_offsets = [np.concatenate([[0], np.cumsum(self.shard_rows[s])]) for s in self.stream_shards]
        lengths = np.array([o[-1] for o in self.stream_offsets], dtype=np.int64)
        # Round robin with skipping: in round t every stream longer than t gives one sample. Between two
        # distinct lengths the set of streams still going is fixed; `_levels` holds, per such segment, the
        # first round, the first position and the streams in it.
        self._levels = []
        position, previous = 0, 0
        for length in np.unique(lengths):
            going = np.flatnonzero(lengths >= length)  # streams that still give samples in rounds < length
            self._levels.append((previous, position, going))
            position += (int(length) - previous) * len(going)
            previous = int(length)
        self._level_positions = np.array([level[1] for level in self._levels], dtype=np.int64)
        self._shard_permutation = lru_cache(maxsize=64)(self._permute_shard)

    def _permute_shard(self, shard: int) -> np.ndarray:
        return rng(self.seed, self.epoch, shard, 0x12345).permutation(int(self.shard_rows[shard]))

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The dataset rows at these positions of the epoch (any order, any count)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.num_samples):
            raise IndexError(f"position outside the epoch's {self.num_samples} samples")
        out = np.empty_like(positions)
        level_of = np.searchsorted(self._level_positions, positions, side="right") - 1
        for level in np.unique(level_of):
            first_round, first_position, going = self._levels[level]
            mask = level_of == level
            offset = positions[mask] - first_position
            rounds = first_round + offset // len(going)
            streams = going[offset % len(going)]
            out[mask] = self._stream_rows(streams, rounds)
        return out

    def _stream_rows(self, streams: np.ndarray, within: np.ndarray) -> np.ndarray:
        out = np.empty_like(within)
        for stream in np.unique(streams):
            mask = streams == stream
            offsets = self.stream_offsets[stream]
            which = np.searchsorted(offsets, within[mask], side="right") - 1  # the stream's k-th shard
            shards = self.stream_shards[stream][which]
            row_in_shard = within[mask] - offsets[which]
            rows = np.empty_like(row_in_shard)
            for shard in np.unique(shards):
                at = shards == shard
                rows[at] = self._shard_permutation(int(shard))[row_in_shard[at]]
            out[mask] = self.shard_start[shards] + rows
        return out


@dataclass(frozen=True)
class Slot:
    """Where one micro-batch lies in the run's sample stream."""
    start: int  # run position of its first sample
    size: int  # samples (the micro-batch)


@dataclass(frozen=True)
class BatchLayout:
    """The batch sizes as DeepSpeed computes them from its JSON and the world size, and how steps cut the
    stream with them: micro-batch B, accumulation A, world size W, this rank; and the ZeRO stage (the config
    checks need it). ``ds_face.config`` builds it; the loader takes it with this rank filled in."""
    micro_batch: int
    accumulation: int
    world_size: int
    rank: int = 0
    zero_stage: int = 0

    @property
    def global_batch(self) -> int:
        """G: the samples of one optimizer step."""
        return self.micro_batch * self.accumulation * self.world_size


    def slot(self, step_start: int, micro_step: int) -> Slot:
        """This rank's micro-batch ``micro_step`` of the step that starts at run position ``step_start``."""
        k = micro_step * self.world_size + self.rank
        return Slot(step_start + k * self.micro_batch, self.micro_batch)




class SampleStream:
    """The run's stream: run position -> (epoch, dataset row) for a dataset of ``shard_rows``."""

    def __init__(self, shard_rows: list[int], streams: int, seed: int):
        self.shard_rows, self.streams, self.seed = list(shard_rows), streams, seed
        self.epoch_size = int(sum(shard_rows))
        self._orders: dict[int, EpochOrder] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_orders": {}}  # a cache (not picklable): a DataLoader worker builds its own

    def order(self, epoch: int) -> EpochOrder:
        if epoch not in self._orders:
            if len(self._orders) > 2:  # a micro-batch spans at most two epochs
                self._orders.pop(min(self._orders))
            self._orders[epoch] = EpochOrder(self.shard_rows, self.streams, self.seed, epoch)
        return self._orders[epoch]

    def samples(self, slot: Slot) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, dataset row) of each sample of a micro-batch."""
        positions = np.arange(slot.start, slot.start + slot.size, dtype=np.int64)
        epochs, within = np.divmod(positions, self.epoch_size)
        rows = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            rows[mask] = self.order(int(epoch)).rows(within[mask])
        return epochs, rows


def run_end(total_samples: int, position: int, global_batch: int) -> int:
    """Where a run at ``position`` ends with steps of ``global_batch``: the last whole step before
    ``total_samples`` (epochs x N). The rest, < one global batch, is never trained."""
    return position + max(0, total_samples - position) // global_batch * global_batch
