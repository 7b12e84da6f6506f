"""Partial FC: the class-centre matrix sharded over ranks, kept outside DeepSpeed.

Rank r owns the contiguous class range ``[class_start, class_start + num_local)``
(the same split as arcface_torch: C // W classes each, the first C % W ranks one
more). One forward call, on every rank:

1. all-gather the embeddings and labels of the global micro-batch (N = W x B);
2. pick this step's active centres: with ``sample_rate == 1`` all of them (model
   parallelism); otherwise every positive centre plus negatives drawn per block of
   classes from the seed and the run's position alone (``ds_face.head.sampling``:
   the same centres on any world size, at a cost that grows with the rows used);
3. cosine logits of all N embeddings against the active centres, margin on the
   target entries, distributed softmax cross-entropy (max and sum all-reduced);
   the loss is the mean over the N samples and identical on every rank.

Memory: the active centres are a fresh leaf tensor each micro-step (the sampled
rows read from the head's store, or an alias of the whole slice at rate 1.0 on
the device), so autograd allocates gradient only for rows the step used.
``HeadOptimizer`` then updates exactly those rows (read, update, write back).
Where the slice and its optimizer state live (device, host memory, disk) and in
which dtype is the store's business (``ds_face.head.storage``), not the maths'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ds_face.runtime import dist
from ds_face.head.margins import Margin
from ds_face.head.sampling import active_classes, initial_rows, mean_rows_used
from ds_face.head.storage import HeadStore


def class_shard(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first class, number of classes) owned by ``rank``."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + int(rank < extra)


@dataclass
class ActiveRows:
    """The centres one micro-step used: row ids (None = all rows) and their leaf tensor."""
    index: torch.Tensor | None
    weight: torch.Tensor


class PartialFC(nn.Module):
    def __init__(self, embedding_size: int, num_classes: int, sample_rate: float, margin: Margin,
                 rank: int | None = None, world_size: int | None = None,
                 device: torch.device | str = "cpu", seed: int = 0, storage: str = "device",
                 storage_dtype: str = "float32", storage_dir=None):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.rank = dist.rank() if rank is None else rank
        self.world_size = dist.world_size() if world_size is None else world_size
        if num_classes < self.world_size:
            raise ValueError(f"num_classes ({num_classes}) must be >= world size ({self.world_size})")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.sample_rate, self.margin = sample_rate, margin
        self.class_start, self.num_local = class_shard(num_classes, self.rank, self.world_size)
        self.num_sample = mean_rows_used(sample_rate, self.num_local)  # about; positives come on top
        self.seed, self.position = seed, 0
        # The slice [num_local, D] lives in the store (device, host or disk); a buffer of this module would pin
        # it to the device. Its initial values are arcface_torch's N(0, 0.01), seeded per block of classes.
        self.store = HeadStore(self.num_local, storage, storage_dtype, device, storage_dir, self.rank)
        self.store.add("weight", embedding_size)
        initial_rows(seed, num_classes, embedding_size, self.class_start, self.num_local,
                     lambda row, values: self.store.fill("weight", row, values))
        self._pending: list[ActiveRows] = []
        self._prepared = None

    @property
    def weight(self) -> torch.Tensor:
        """This rank's centres as stored (storage dtype, wherever the store keeps them)."""
        return self.store.whole("weight")

    def extra_repr(self) -> str:
        return (f"classes={self.class_start}..{self.class_start + self.num_local - 1} of {self.num_classes}, "
                f"embedding={self.embedding_size}, sample_rate={self.sample_rate}")

    # -- sampling ---------------------------------------------------------------------------------
    def set_position(self, position: int) -> None:
        """Fix the next micro-step's negatives by the run's position (its first sample's index in the run)."""
        self.position = position

    def sample(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Sorted local row ids to use this micro-step (``labels``: the global micro-batch's), or None for all."""
        if self.sample_rate >= 1.0:
            return None
        return active_classes(self.seed, self.position, self.num_classes, self.sample_rate,
                              labels.to(self.store.home), self.class_start, self.num_local)

    # -- forward ----------------------------------------------------------------------------------
    def prepare(self, local_labels: torch.Tensor) -> None:
        """Gather the micro-batch's labels and pick its centres before the backbone's forward, so that the
        copy of those rows from host or disk storage (in ``forward``) runs while the accelerator computes the
        forward. Optional: ``forward`` does it itself when it was not called (the same result)."""
        labels = dist.all_gather_no_grad(local_labels.long())
        self._check_labels(labels)
        self._prepared = (local_labels, labels, self.sample(labels))

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        if self._prepared is None or self._prepared[0] is not local_labels:
            self.prepare(local_labels)
        _, labels, index = self._prepared
        self._prepared = None
        embeddings = dist.all_gather_with_grad(local_embeddings.float())
        labels = labels.to(embeddings.device)

        local = labels - self.class_start
        rows = torch.nonzero((local >= 0) & (local < self.num_local)).squeeze(1)
        active = self.store.read("weight", index).requires_grad_(True)  # an alias at rate 1.0 on the device
        if index is None:
            cols = local[rows]
        else:
            index = index.to(embeddings.device)
            cols = torch.searchsorted(index, local[rows])
        self._pending.append(ActiveRows(index, active))

        cos = cosine(embeddings, active).clamp(-1.0, 1.0)
        logits = self.margin.logits(cos, rows, cols)
        return distributed_cross_entropy(logits, rows, cols)

    def _check_labels(self, labels: torch.Tensor) -> None:
        # Every rank sees the same gathered labels, so every rank raises together: no hang.
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"label {int(bad[0])} is outside [0, {self.num_classes}) "
                             f"(head.num_classes in the run config); {bad.numel()} bad label(s) in this step")

    # -- gradients for the optimizer --------------------------------------------------------------
    def take_gradients(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Gradients of the micro-steps since the last call, summed per row.

        Returns ``(row ids or None for all rows, gradient)``; ``(None, None)`` if
        there was no micro-step. Still scaled by DeepSpeed's loss scale.
        """
        pending, self._pending = self._pending, []
        if not pending:
            return None, None
        for item in pending:
            if item.weight.grad is None:
                raise RuntimeError("Partial FC got no gradient: call engine.backward(loss) on the head's loss")
        if pending[0].index is None:
            return None, torch.stack([p.weight.grad for p in pending]).sum(0) if len(pending) > 1 \
                else pending[0].weight.grad
        index = torch.cat([p.index for p in pending])
        grads = torch.cat([p.weight.grad for p in pending])
        rows, where = torch.unique(index, return_inverse=True)
        return rows, torch.zeros(rows.numel(), grads.shape[1], device=grads.device).index_add_(0, where, grads)

    def pending_rows(self) -> list[ActiveRows]:
        """The active rows of the micro-steps since the last optimizer step (for inspection and tests)."""
        return list(self._pending)

    # -- checkpoints: this rank's class range, re-sliced to any world size on load ----------------
    def shard_state(self) -> dict:
        """Float32 on the CPU whatever the storage: one checkpoint format (a float32 store's table as it is)."""
        return {"class_start": self.class_start, "num_local": self.num_local, "num_classes": self.num_classes,
                "embedding_size": self.embedding_size, "weight": self.weight.detach().to("cpu", torch.float32)}

    def load_shards(self, shards: list[dict]) -> None:
        """Take this rank's rows from the slices of all ranks of a save (any world size; checked to tile)."""
        for row, values in row_pieces(shards, lambda s: s["weight"], self.class_start, self.num_local):
            self.store.fill("weight", row, values)


def row_pieces(shards: list[dict], get, start: int, count: int):
    """Rows [start, start + count) of the class-indexed tensor ``get(shard)`` over slices that tile the classes
    in order (each has ``class_start`` and ``num_local``), as ``(row within the range, tensor)`` pieces: a
    store fills itself piece by piece, with no whole-slice temporary."""
    for shard in shards:
        lo = max(start, shard["class_start"])
        hi = min(start + count, shard["class_start"] + shard["num_local"])
        if lo < hi:
            yield lo - start, get(shard)[lo - shard["class_start"]:hi - shard["class_start"]]


def cosine(embeddings: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [N, A] of every embedding with every centre.

    The same value as ``linear(normalize(e), normalize(w))``, but the centres' norms divide the columns of
    the product instead of the centres themselves: ``normalize(w)`` would keep a normalised copy of all A
    centres for backward and build several more [A, D] temporaries in it: at model parallel (A = the whole
    slice) those dominate the head's peak memory (``python -m ds_face.bench memory --measure`` shows it).
    Here backward makes the centres' gradient and one [A, D] temporary.
    """
    inverse_norm = centres.norm(dim=1).clamp_min(1e-12).reciprocal()
    return F.linear(F.normalize(embeddings), centres) * inverse_norm


LOSS_CAP = -math.log(1e-30)  # arcface_torch's largest per-sample loss (its clamp_min(1e-30) before the log)


def distributed_cross_entropy(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy over a class dimension split across ranks.

    ``logits`` is this rank's ``[N, classes_here]`` block; sample ``rows[i]`` has
    its target at column ``cols[i]`` on this rank (targets on other ranks are
    absent here). loss_n = log(sum_all_ranks exp(z - M)) + M - z_target.
    """
    shift = logits.detach().max(dim=1).values
    dist.all_reduce_max_(shift)  # any shift is exact; the global max avoids overflow
    sum_exp = dist.all_reduce_sum_with_grad(torch.exp(logits - shift[:, None]).sum(dim=1))
    target = torch.zeros_like(shift).index_put((rows,), logits[rows, cols])
    target = dist.all_reduce_sum_with_grad(target)
    per_sample = torch.log(sum_exp) + shift - target
    # The value reported is arcface_torch's: it clamps each target probability at 1e-30 before the log, so a
    # sample's loss reads at most -ln(1e-30) = 69.08 (reached when theta + m passes pi). The gradient is the
    # true, unclamped one, as arcface_torch's backward (softmax - one-hot) is too.
    reported = per_sample.detach().clamp_max(LOSS_CAP).mean()
    true = per_sample.mean()
    return true + (reported - true).detach()
