"""This rank's micro-batches, from any position of the run's sample stream.

``Loader(source, layout).micro_batches(start, stop)`` yields, for each optimizer step from run position
``start`` to ``stop``, this rank's ``accumulation`` micro-batches (``ds_face.data.order`` says which samples
each holds). DataLoader workers build micro-batches in parallel; micro-batch k of the rank is built by
whichever worker gets it, and the DataLoader hands them over in order, so the samples do not depend on the
worker count either.

Every rank gets the same number of micro-batches (every step has ``world_size x accumulation`` slots of
``micro_batch`` samples), so no collective ever waits on a rank that ran out.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterator

import numpy as np
import torch

from ds_face.data.arrow import DataError
from ds_face.data.cache import Prefetcher
from ds_face.data.order import BatchLayout, SampleStream

log = logging.getLogger("ds_face")


class _MicroBatches(torch.utils.data.Dataset):
    """Micro-batch k of this rank, k counted from the first step of this pass (runs in the workers)."""

    def __init__(self, source, stream: SampleStream, layout: BatchLayout, start: int, steps: int):
        self.source, self.stream, self.layout, self.start, self.steps = source, stream, layout, start, steps

    def __len__(self) -> int:
        return self.steps * self.layout.accumulation

    def __getitem__(self, k: int) -> dict:
        step, micro_step = divmod(k, self.layout.accumulation)
        slot = self.layout.slot(self.start + step * self.layout.global_batch, micro_step)
        epochs, rows = self.stream.samples(slot)
        before = cache_counts(self.source)
        try:
            batch = self.source.make(epochs, rows)
            batch["cache"] = tuple(b - a for a, b in zip(before, cache_counts(self.source)))
        except DataError as err:  # handed over as a message: a DataLoader would re-raise it wrapped in the
            return {"error": str(err)}  # worker's traceback; the trainer raises it again, one line
        # Only the image (a tensor) crosses through shared memory. Labels, rows and epochs stay numpy, pickled
        # into the message: each shared tensor costs the receiving trainer a file-descriptor hand-over
        # (connect, authenticate, recvmsg), and three more per batch took ~10% of its core.
        return {**batch, "epoch": epochs}


def cache_counts(source) -> tuple[int, int, int, int]:
    """(shard cache hits, misses, bytes fetched, retries) of this process: a remote Arrow source's, else zeros."""
    cache = getattr(source, "cache", None)
    if cache is None:
        return 0, 0, 0, 0
    return cache.hits, cache.misses, cache.store.stats.bytes_fetched, cache.store.stats.retries


def _as_they_are(batch: dict) -> dict:
    """The DataLoader's collate step: nothing (its default would make the numpy arrays shared tensors again)."""
    return batch


class Loader:
    """Micro-batches of one rank: ``{"image": uint8 [B, 112, 112, 3] (RGB), "label": int64 [B], "sample": int64
    [B] (dataset row), "epoch": int64 [B]}``. The training step normalises the images where the model runs
    (``ds_face.data.arrow.normalize``): a quarter of float32's bytes cross to the device."""

    def __init__(self, source, layout: BatchLayout, *, streams: int = 16, seed: int = 2048, num_workers: int = 0):
        self.source, self.layout, self.num_workers = source, layout, num_workers
        self.streams, self.seed = streams, seed
        self.stream = SampleStream(source.shard_rows, streams, seed)
        self.epoch_size = self.stream.epoch_size
        self.corrupt_images = 0

    def micro_batches(self, start: int, stop: int) -> Iterator[dict]:
        """The micro-batches of every whole step in [start, stop) of the run's sample stream."""
        steps = max(0, stop - start) // self.layout.global_batch
        dataset = _MicroBatches(self.source, self.stream, self.layout, start, steps)
        from deepspeed.accelerator import get_accelerator
        pin = get_accelerator().device_name() != "cpu"  # page-locked batches: asynchronous host-to-device copies
        prefetcher = self._prefetch(start, steps)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                             prefetch_factor=4 if self.num_workers else None, pin_memory=pin,
                                             collate_fn=_as_they_are)
        counts, samples, at_start = [0, 0, 0, 0], 0, cache_counts(self.source)
        try:
            for k, batch in enumerate(loader):
                if "error" in batch:
                    raise DataError(batch["error"])
                if prefetcher is not None and k % self.layout.accumulation == 0:
                    step = k // self.layout.accumulation
                    mine = range(self.layout.rank, self.layout.rank + 1)
                    prefetcher.advance(step, self._step_shards(self.stream, start, step, mine).tolist())
                self.corrupt_images += batch["corrupt"]
                counts = [c + d for c, d in zip(counts, batch["cache"])]
                samples += len(batch["label"])
                yield {"image": batch["image"], **{k: torch.from_numpy(batch[k]) for k in ("label", "sample", "epoch")}}
        finally:
            if prefetcher is not None:
                prefetcher.stop()
                self._log_cache(counts, at_start, samples)

    # -- shards in object storage: fetched ahead, in the run's own order ---------------------------------
    def _step_shards(self, stream: SampleStream, start: int, step: int, ranks: range) -> np.ndarray:
        """The shards that ``ranks``' slots of step ``step`` (counted from ``start``) read."""
        first = start + step * self.layout.global_batch
        rows = []
        for rank in ranks:
            layout = dataclasses.replace(self.layout, rank=rank)
            rows += [stream.samples(layout.slot(first, micro))[1] for micro in range(layout.accumulation)]
        return self.source.shards_of(np.concatenate(rows))

    def _prefetch(self, start: int, steps: int):
        cache = getattr(self.source, "cache", None)
        if cache is None or steps == 0:
            return None
        everyone = range(self.layout.world_size)
        need = sum(cache.manifest.shards[s].bytes for s in self._step_shards(self.stream, start, 0, everyone))
        if need > cache.budget:  # one step's shards must fit at once: every rank of a node reads them together
            raise DataError(f"data.cache_gb is {cache.budget / 2**30:.3g} GiB, smaller than the shards one "
                            f"optimizer step reads ({need / 2**30:.3g} GiB at sample {start}); set data.cache_gb to "
                            f"at least {need / 2**30 * 2:.3g} (room for the next step's too)")
        mine = range(self.layout.rank, self.layout.rank + 1)
        ahead = SampleStream(self.source.shard_rows, self.streams, self.seed)  # the thread's own (its caches)
        upcoming = ((k, self._step_shards(ahead, start, k, mine).tolist()) for k in range(steps))
        return Prefetcher(cache, upcoming, ahead=2)

    def _log_cache(self, readers: list[int], at_start: tuple, samples: int) -> None:
        """The pass's shard reads (the readers': workers or this process) and what this rank fetched: the
        workers' fetches and retries came with their batches; this process's (its prefetcher's, and its reads
        without workers) are the change of its own counters over the pass."""
        hits, misses = readers[0], readers[1]
        here = [now - then for now, then in zip(cache_counts(self.source), at_start)]
        fetched, retries = here[2], here[3]
        if self.num_workers:
            fetched, retries = fetched + readers[2], retries + readers[3]
        reads = hits + misses
        log.info(f"object store {self.source.cache.store.url}: this rank read {reads} shard(s), "
                 f"{hits / max(reads, 1):.1%} from the node's cache; {fetched / max(samples, 1):,.0f} bytes fetched "
                 f"per sample; {retries} retr{'y' if retries == 1 else 'ies'}")

    def state_dict(self) -> dict:
        """What the sample order depends on; the position itself is the run's (samples seen)."""
        return {**self.source.identity(), "streams": self.streams, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = sorted(k for k in set(mine) | set(state) if mine.get(k) != state.get(k))
        if changed:
            log.warning(f"the data differ from the checkpoint's ({', '.join(f'{k}: {state.get(k)} -> {mine.get(k)}' for k in changed)}): "
                        f"training continues at the same sample count, but not with exactly the samples not yet "
                        f"seen")
