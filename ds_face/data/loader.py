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

import logging
from typing import Iterator

import torch

from ds_face.data.arrow import DataError
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
        try:
            batch = self.source.make(epochs, rows)
        except DataError as err:  # handed over as a message: a DataLoader would re-raise it wrapped in the
            return {"error": str(err)}  # worker's traceback; the trainer raises it again, one line
        # Only the image (a tensor) crosses through shared memory. Labels, rows and epochs stay numpy, pickled
        # into the message: each shared tensor costs the receiving trainer a file-descriptor hand-over
        # (connect, authenticate, recvmsg), and three more per batch took ~10% of its core.
        return {**batch, "epoch": epochs}


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
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                             prefetch_factor=4 if self.num_workers else None, pin_memory=pin,
                                             collate_fn=_as_they_are)
        for batch in loader:
            if "error" in batch:
                raise DataError(batch["error"])
            self.corrupt_images += batch["corrupt"]
            yield {"image": batch["image"], **{k: torch.from_numpy(batch[k]) for k in ("label", "sample", "epoch")}}

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
