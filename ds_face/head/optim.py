"""The Partial FC head's own optimizer, which follows the DeepSpeed engine.

DeepSpeed never sees the head, so this class does for it what the engine does
for the backbone, in lock-step with it:

* gradients arrive multiplied by the engine's loss scale (fp16) and already
  divided by the accumulation count (the engine divides the loss); we divide by
  the loss scale the backward pass used, nothing else;
* we step only at accumulation boundaries, and skip exactly the steps the
  engine skipped (``engine.was_step_applied()``) plus any step where a head
  gradient is inf/NaN on any rank (agreed by an all-reduce);
* the learning rate is the engine's for the same step, so one schedule drives both.

Updates are sparse: only the rows the step used are read from the head's store,
changed and written back (PLSC-style gather-update-scatter), wherever the store
keeps them; momentum and weight decay of rows the
step did not sample are left alone. At sample_rate 1.0 every row is used and the
update is plain SGD / AdamW, identical to ``torch.optim``.
"""
from __future__ import annotations

import torch

from ds_face.runtime import dist
from ds_face.config import OPTIMIZERS
from ds_face.head.partial_fc import PartialFC, row_pieces


class HeadOptimizer:
    def __init__(self, head: PartialFC, name: str = "sgd", momentum: float = 0.9, weight_decay: float = 5e-4,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if name not in OPTIMIZERS:
            raise ValueError(f"head optimizer must be one of {OPTIMIZERS}, got {name!r}")
        self.head, self.name = head, name
        self.momentum, self.weight_decay, self.betas, self.eps = momentum, weight_decay, betas, eps
        # The optimizer state lives beside the centres, in the head's store (same rows, same home and dtype).
        store, width = head.store, head.embedding_size
        self.names = ("momentum_buffer",) if name == "sgd" else ("exp_avg", "exp_avg_sq", "step")
        for key in self.names:
            if key == "step":  # per-row step count: a row's bias correction counts only the steps that moved it
                store.add(key, None, torch.int64)
            else:
                store.add(key, width)
        self.steps_applied = 0
        self.steps_skipped = 0

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The optimizer state as stored (for checkpoints and inspection)."""
        return {key: self.head.store.whole(key) for key in self.names}

    def step(self, lr: float, loss_scale: float = 1.0, engine_applied: bool = True) -> bool:
        """Apply the accumulated head gradients; returns whether the step was applied.

        Call on every rank at every accumulation boundary, after ``engine.step()``.
        """
        rows, grad = self.head.take_gradients()
        if grad is None:
            raise RuntimeError("HeadOptimizer.step() without a forward/backward through the head since the last step")
        grad.div_(loss_scale)  # in place: the gradient is ours (take_gradients let go of it)
        finite = not dist.any_rank(not bool(torch.isfinite(grad).all()), grad.device)
        if not (engine_applied and finite):
            self.steps_skipped += 1
            return False
        with torch.no_grad():
            self._update(rows, grad, lr)
        self.steps_applied += 1
        return True

    def _update(self, rows: torch.Tensor | None, grad: torch.Tensor, lr: float) -> None:
        # Read the used rows (a copy), update them, write them back. With rows None every row is used: on the
        # device in float32 the reads are the tables themselves, updated in place, no copies.
        store = self.head.store
        weight = store.read("weight", rows)
        state = {key: store.read(key, rows) for key in self.names}
        if self.name == "sgd":
            buf = state["momentum_buffer"]
            # In place on grad (ours, dropped after the step): at rate 1.0 a temporary would be a whole
            # slice. Same order of operations as torch.optim.SGD: (grad + wd * w), then into the buffer.
            buf.mul_(self.momentum).add_(grad.add_(weight, alpha=self.weight_decay))
            weight.add_(buf, alpha=-lr)
        else:
            beta1, beta2 = self.betas
            exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
            step.add_(1)
            weight.mul_(1.0 - lr * self.weight_decay)
            exp_avg.lerp_(grad, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            bias1 = (1.0 - beta1 ** step.double()).float()[:, None]
            bias2 = (1.0 - beta2 ** step.double()).float()[:, None]
            denom = (exp_avg_sq / bias2).sqrt_().add_(self.eps)
            weight.addcdiv_(exp_avg / bias1, denom, value=-lr)
        store.write("weight", rows, weight)
        for key, value in state.items():
            store.write(key, rows, value)

    # -- checkpoints: this rank's optimizer rows, re-sliced to any world size like the head's weight --
    def shard_state(self) -> dict:
        return {"name": self.name, "class_start": self.head.class_start, "num_local": self.head.num_local,
                "state": {k: v.to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
                          for k, v in self.state.items()},
                "steps_applied": self.steps_applied, "steps_skipped": self.steps_skipped}

    def load_shards(self, shards: list[dict]) -> None:
        """``shards``: every rank's ``shard_state()`` of one save, in rank order (any world size)."""
        names = {s["name"] for s in shards}
        if names != {self.name}:
            raise ValueError(f"head optimizer state is for {sorted(names)}, this run uses {self.name!r}")
        for key in self.names:
            for row, values in row_pieces(shards, lambda s: s["state"][key], self.head.class_start,
                                          self.head.num_local):
                self.head.store.fill(key, row, values)
        self.steps_applied, self.steps_skipped = shards[0]["steps_applied"], shards[0]["steps_skipped"]
