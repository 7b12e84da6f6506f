"""The head following the real DeepSpeed engine, on real gloo ranks.

Every worker builds the actual ``ds_face.training.trainer.Trainer`` (DeepSpeed engine
around an IResNet, Partial FC outside it) and drives it with ``micro_step``,
the function the training loop uses.
"""
import functools

import pytest
import torch

from ds_face.data.arrow import normalize
from ds_face.runtime.spawn import run_ranks
from ds_face.training.trainer import loss_scale, micro_step
from tests import conftest
from tests.conftest import in_turn  # several runs on one set of ranks, one after the other

CLASSES, EMBEDDING = 11, 32
make_trainer = functools.partial(conftest.make_trainer, classes=CLASSES, embedding=EMBEDDING, samples=100_000)


LR = 0.1  # the learning rate of every step here; the trainer's schedule is tested in tests/test_elastic.py


def global_batch(size, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 112, 112, generator=gen), torch.randint(0, CLASSES, (size,), generator=gen)


def full_head_weight(seed=6):
    return torch.randn(CLASSES, EMBEDDING, generator=torch.Generator().manual_seed(seed)) * 0.1


# The 2-rank runs of sections 3, 4 and 5 (bf16) share one process group, one run after the other: each rank's
# process start-up (imports) costs seconds. fp16's run patches DeepSpeed in-process and keeps its own (section 5).
@pytest.fixture(scope="module")
def on_two_ranks():
    """{run: its result per rank}: the one-step split of section 3, the trajectory of each ZeRO stage, bf16."""
    runs = {"micro 8 x 1": (_one_step_worker, (8, 1)),
            **{f"ZeRO {stage}": (_trajectory_worker, (stage,)) for stage in (0, 1, 2, 3)},
            "bf16": (_bf16_worker, ())}
    per_rank = run_ranks(2, in_turn, runs, timeout=300.0 * len(runs))  # a hang still fails
    return {name: [r[name] for r in per_rank] for name in runs}


# -- 3. the same update however the global batch is split -------------------------------------------

def _one_step_worker(rank, world_size, micro, accumulation):
    trainer = make_trainer(world_size, micro=micro, accumulation=accumulation)
    head = trainer.head
    head.weight.copy_(full_head_weight()[head.class_start:head.class_start + head.num_local])
    trainer.engine.eval()  # frozen batch statistics: per-sample results independent of batch split
    images, labels = global_batch(2 * 8)
    mine = slice(rank * micro * accumulation, (rank + 1) * micro * accumulation)
    images, labels = images[mine], labels[mine]
    for k in range(accumulation):
        part = slice(k * micro, (k + 1) * micro)
        result = micro_step(trainer.engine, head, trainer.head_optimizer,
                            {"image": images[part], "label": labels[part]}, LR)
    assert result.boundary and result.applied
    return {"backbone": {k: v.clone() for k, v in trainer.engine.module.state_dict().items()},
            "head": head.weight.clone(), "global_steps": trainer.engine.global_steps}


def test_same_update_however_the_batch_is_split(on_two_ranks):
    two_ranks = on_two_ranks["micro 8 x 1"]
    one_rank = run_ranks(1, in_turn, {"micro 8 x 2": (_one_step_worker, (8, 2)),
                                      "micro 16 x 1": (_one_step_worker, (16, 1))})[0]  # one after the other
    accumulated, one_big = one_rank["micro 8 x 2"], one_rank["micro 16 x 1"]
    assert len(two_ranks) == 2
    two_rank_head = torch.cat([r["head"] for r in two_ranks])
    for other in (accumulated, one_big):
        torch.testing.assert_close(two_rank_head, other["head"], atol=1e-6, rtol=1e-5)
        for key, value in other["backbone"].items():
            torch.testing.assert_close(two_ranks[0]["backbone"][key], value, atol=1e-6, rtol=1e-5, msg=key)
    # The update really moved the weights (a no-op would also be "equal").
    assert not torch.allclose(two_rank_head, full_head_weight())
    # One optimizer step under accumulation, not one per micro-batch (the LR schedule, a function of samples,
    # is tested in tests/test_elastic.py).
    assert accumulated["global_steps"] == 1


# -- 4. ZeRO stages agree ---------------------------------------------------------------------------

def _trajectory_worker(rank, world_size, stage):
    trainer = make_trainer(world_size, micro=8, stage=stage, sample_rate=0.5)
    losses = []
    for step, batch in enumerate(trainer.loader.micro_batches(0, trainer.plan().total)):
        losses.append(micro_step(trainer.engine, trainer.head, trainer.head_optimizer, batch, LR).loss.item())
        if step == 4:
            return losses


def test_zero_stages_give_the_same_loss_trajectory(on_two_ranks):
    trajectories = {stage: on_two_ranks[f"ZeRO {stage}"][0] for stage in (0, 1, 2, 3)}
    reference = torch.tensor(trajectories[0])
    assert reference[-1] < reference[0], "the run must actually learn for the comparison to mean anything"
    for stage in (1, 2, 3):
        torch.testing.assert_close(torch.tensor(trajectories[stage]), reference, atol=1e-4, rtol=1e-4,
                                   msg=f"ZeRO stage {stage}")


# -- 5. fp16 overflow: the engine skips, the head skips with it; bf16 trains --------------------------

def _enable_fp16_on_cpu():
    # DeepSpeed's CPU accelerator reports fp16 unsupported unless the CPU has
    # AVX512-FP16, yet torch runs fp16 convolutions on any CPU. Lifting that one
    # probe lets the real fp16 optimizer and dynamic loss scaler run here.
    from deepspeed.accelerator import get_accelerator
    get_accelerator().is_fp16_supported = lambda: True


def _snapshot(trainer):
    return {"head": trainer.head.weight.clone(),
            "momentum": trainer.head_optimizer.state["momentum_buffer"].clone(),
            "backbone": trainer.engine.module.fc.weight.detach().float().clone()}


def _fp16_overflow_worker(rank, world_size):
    _enable_fp16_on_cpu()
    trainer = make_trainer(world_size, micro=4, precision="fp16")
    engine, head, head_opt = trainer.engine, trainer.head, trainer.head_optimizer
    batches = trainer.loader.micro_batches(0, trainer.plan().total)
    out = {}

    micro_step(engine, head, head_opt, next(batches), LR)  # a normal step: momentum is now non-zero
    out["first_applied"] = engine.was_step_applied()

    # Overflow in the backbone: an inf gradient arrives at the embeddings on rank 0 only.
    before, scale_before = _snapshot(trainer), loss_scale(engine)
    def poison_gradient(module, args, output):
        if rank == 0:
            output.register_hook(lambda grad: grad * float("inf"))

    hook = engine.module.register_forward_hook(poison_gradient)
    result = micro_step(engine, head, head_opt, next(batches), LR)
    hook.remove()
    out.update(overflow_applied=result.applied, engine_applied=engine.was_step_applied(),
               scale_before=scale_before, scale_after=loss_scale(engine), before=before, after=_snapshot(trainer))

    # Overflow only in the head's gradients on rank 1: DeepSpeed can't see it, the head must
    # still skip, on both ranks.
    before = _snapshot(trainer)
    loss = head(engine(normalize(next(batches)["image"]).half()), torch.arange(4) % CLASSES)
    engine.backward(loss)
    if rank == 1:
        head.pending_rows()[0].weight.grad[0, 0] = float("nan")
    lr, scale = engine.get_lr()[0], loss_scale(engine)
    engine.step()
    out.update(head_nan_engine_applied=engine.was_step_applied(),
               head_nan_applied=head_opt.step(lr, scale, engine.was_step_applied()),
               head_nan_before=before["head"], head_nan_after=head.weight.clone())

    result = micro_step(engine, head, head_opt, next(batches), LR)
    out.update(recovered=result.applied, skipped=head_opt.steps_skipped, applied=head_opt.steps_applied)
    return out


def test_fp16_overflow_skips_backbone_and_head_on_every_rank():
    for rank, out in enumerate(run_ranks(2, _fp16_overflow_worker)):
        assert out["first_applied"]
        assert not out["engine_applied"] and not out["overflow_applied"]
        assert out["scale_after"] == out["scale_before"] / 2, "dynamic loss scale halves on overflow"
        for key in ("head", "momentum", "backbone"):
            assert torch.equal(out["before"][key], out["after"][key]), f"rank {rank}: {key} changed"
        # Head-only NaN on rank 1: the engine applied its step, the head skipped on both ranks.
        assert out["head_nan_engine_applied"] and not out["head_nan_applied"]
        assert torch.equal(out["head_nan_before"], out["head_nan_after"])
        assert out["recovered"]
        assert (out["skipped"], out["applied"]) == (2, 2)


def _bf16_worker(rank, world_size):
    trainer = make_trainer(world_size, micro=8, precision="bf16")
    losses = [micro_step(trainer.engine, trainer.head, trainer.head_optimizer, batch, LR).loss.item()
              for _, batch in zip(range(12), trainer.loader.micro_batches(0, trainer.plan().total))]
    return {"losses": losses, "dtype": str(next(trainer.engine.module.parameters()).dtype)}


def test_bf16_trains(on_two_ranks):
    out = on_two_ranks["bf16"][0]
    losses = torch.tensor(out["losses"])
    assert out["dtype"] == "torch.bfloat16"
    assert torch.isfinite(losses).all()
    assert losses[-3:].mean() < losses[:3].mean()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_head_optimizer_matches_torch_optim_at_full_rate(name):
    """At sample_rate 1.0 the sparse row update is exactly torch.optim's update."""
    from ds_face.head import HeadOptimizer, Margin, PartialFC, cosine
    torch.manual_seed(0)  # the data below; the comparison holds for any (60 seeds checked at this tolerance)
    head = PartialFC(EMBEDDING, CLASSES, 1.0, Margin.arcface(), rank=0, world_size=1)
    reference = torch.nn.Parameter(head.weight.clone())
    torch_opt = (torch.optim.SGD([reference], lr=0.1, momentum=0.9, weight_decay=5e-4) if name == "sgd"
                 else torch.optim.AdamW([reference], lr=0.01, weight_decay=0.1))
    ours = HeadOptimizer(head, name, momentum=0.9, weight_decay=5e-4 if name == "sgd" else 0.1)
    for step in range(3):
        emb, labels = torch.randn(6, EMBEDDING), torch.randint(0, CLASSES, (6,))
        loss = head(emb, labels)
        (loss * 128).backward()  # pretend the engine's loss scale was 128
        ours.step(lr=0.1 if name == "sgd" else 0.01, loss_scale=128.0)
        torch_opt.zero_grad()
        cos = cosine(emb, reference).clamp(-1, 1)  # the head's formula: this test is about the optimizer
        torch.nn.functional.cross_entropy(head.margin.logits(cos, torch.arange(6), labels), labels).backward()
        torch_opt.step()
        # fp32 rounding: the loss scale round trip and another summation order move weights of ~1e-2 by
        # up to ~5e-6 after three momentum steps; a wrong update would be off by orders of magnitude more
        torch.testing.assert_close(head.weight, reference.detach(), atol=2e-5, rtol=1e-5)
