"""The sharded head against a single-process reference, on 1, 2 and 3 real gloo ranks.

Reference: the full weight, the same margin on the target logits, then
``torch.nn.functional.cross_entropy`` for the gradients and arcface_torch's clamped value for the loss. The local embedding gradient a rank gets
from the head is W x dLoss/dx: DeepSpeed averages backbone gradients over the W
ranks, and that factor makes the average exact (checked end to end in test_engine.py).
"""
import pytest
import torch
import torch.nn.functional as F

from ds_face.data.seeds import mix, splitmix64
from ds_face.head import HeadOptimizer, Margin, PartialFC, class_shard, cosine
from ds_face.head.sampling import BLOCK, active_classes, hash64, initial_rows
from ds_face.runtime.spawn import RankFailed, run_ranks

DIM, PER_RANK = 16, 4
MARGINS = {"arcface": Margin.arcface(0.5), "cosface": Margin.cosface(0.35)}


def make_problem(world_size: int, num_classes: int, seed: int = 0):
    """Global embeddings, labels and full weight, identical in every process."""
    gen = torch.Generator().manual_seed(seed)
    n = world_size * PER_RANK
    return (torch.randn(n, DIM, generator=gen), torch.randint(0, num_classes, (n,), generator=gen),
            torch.randn(num_classes, DIM, generator=gen) * 0.1)


def reference(embeddings, labels, weight, margin):
    embeddings = embeddings.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    cos = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
    loss = F.cross_entropy(margin.logits(cos, torch.arange(len(labels)), labels), labels)
    loss.backward()
    # the value compared is the one arcface_torch reports (each sample's loss capped at -ln(1e-30)); the
    # gradients are the true cross-entropy's
    return arcface_torch_reported_loss(embeddings.detach(), labels, weight.detach(), margin), embeddings.grad, \
        weight.grad


def build_head(rank, world_size, num_classes, margin, sample_rate, weight):
    head = PartialFC(DIM, num_classes, sample_rate, margin, rank=rank, world_size=world_size, seed=1)
    head.weight.copy_(weight[head.class_start:head.class_start + head.num_local])
    return head


def _full_softmax_worker(rank, world_size, num_classes, margin_name):
    margin = MARGINS[margin_name]
    embeddings, labels, weight = make_problem(world_size, num_classes)
    head = build_head(rank, world_size, num_classes, margin, 1.0, weight)
    local = embeddings[rank * PER_RANK:(rank + 1) * PER_RANK].clone().requires_grad_(True)
    loss = head(local, labels[rank * PER_RANK:(rank + 1) * PER_RANK])
    loss.backward()
    rows, weight_grad = head.take_gradients()
    return {"loss": loss.detach(), "emb_grad": local.grad, "weight_grad": weight_grad, "rows": rows,
            "start": head.class_start, "count": head.num_local}


@pytest.mark.parametrize("margin_name", ["arcface", "cosface"])
@pytest.mark.parametrize("world_size,num_classes", [(1, 10), (2, 11), (3, 10)])
def test_full_softmax_equals_reference(world_size, num_classes, margin_name):
    results = run_ranks(world_size, _full_softmax_worker, num_classes, margin_name)
    embeddings, labels, weight = make_problem(world_size, num_classes)
    ref_loss, ref_emb_grad, ref_weight_grad = reference(embeddings, labels, weight, MARGINS[margin_name])
    covered = 0
    for rank, got in enumerate(results):
        assert got["rows"] is None, "sample_rate 1.0 uses every centre"
        assert got["start"] == covered, "class ranges are contiguous and in rank order"
        torch.testing.assert_close(got["loss"], ref_loss, atol=1e-5, rtol=1e-5)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        torch.testing.assert_close(got["emb_grad"] / world_size, ref_emb_grad[rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["weight_grad"], ref_weight_grad[covered:covered + got["count"]],
                                   atol=1e-5, rtol=1e-5)
        covered += got["count"]
    assert covered == num_classes


def test_cosine_equals_normalised_linear_in_value_and_gradient():
    """The head scales columns by 1/||w|| instead of normalising the centres (less memory): same maths."""
    torch.manual_seed(3)
    emb, centres, upstream = torch.randn(6, 512), torch.normal(0.0, 0.01, (40, 512)), torch.randn(6, 40)
    grads = []
    for formula in (cosine, lambda e, w: F.linear(F.normalize(e), F.normalize(w))):
        e, w = emb.clone().requires_grad_(True), centres.clone().requires_grad_(True)
        cos = formula(e, w)
        (cos * upstream).sum().backward()
        grads.append((cos.detach(), e.grad, w.grad))
    for ours, reference in zip(*grads):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    assert grads[0][0].abs().max() <= 1.0 + 1e-6


def test_class_shard_matches_arcface_torch_split():
    # C // W each, the first C % W ranks one more, contiguous.
    assert [class_shard(10, r, 3) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    assert [class_shard(11, r, 2) for r in range(2)] == [(0, 6), (6, 5)]


SAMPLED_CLASSES, SAMPLE_RATE = 101, 0.3


def _sampled_worker(rank, world_size):
    margin = MARGINS["arcface"]
    embeddings, labels, weight = make_problem(world_size, SAMPLED_CLASSES, seed=3)
    head = build_head(rank, world_size, SAMPLED_CLASSES, margin, SAMPLE_RATE, weight)
    optimizer = HeadOptimizer(head, "sgd", momentum=0.9, weight_decay=5e-4)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    out = {"start": head.class_start, "count": head.num_local, "num_sample": head.num_sample, "steps": []}
    for step in range(2):  # two steps: the second one starts with non-zero momentum
        local = embeddings[mine].clone().requires_grad_(True)
        loss = head(local, labels[mine])
        loss.backward()
        index = head.pending_rows()[0].index.clone()
        before = (head.weight.clone(), optimizer.state["momentum_buffer"].clone())
        assert optimizer.step(lr=0.1)
        out["steps"].append({"loss": loss.detach(), "index": index, "weight_before": before[0],
                             "momentum_before": before[1], "weight_after": head.weight.clone(),
                             "momentum_after": optimizer.state["momentum_buffer"].clone()})
    return out


def test_partial_fc_sampling_and_sparse_update():
    world_size = 2
    results = run_ranks(world_size, _sampled_worker)
    embeddings, labels, weight = make_problem(world_size, SAMPLED_CLASSES, seed=3)
    for step in range(2):
        global_index = []
        for got in results:
            s = got["steps"][step]
            index, start, count = s["index"], got["start"], got["count"]
            positives = torch.unique(labels[(labels >= start) & (labels < start + count)] - start)
            # Every positive centre this rank owns is in the sample ...
            assert set(positives.tolist()) <= set(index.tolist())
            assert torch.equal(index, torch.unique(index)), "sorted, no duplicates"
            global_index.append(index + start)
            # Rows outside the sample: weight and momentum untouched by the step.
            untouched = torch.ones(count, dtype=torch.bool)
            untouched[index] = False
            assert torch.equal(s["weight_after"][untouched], s["weight_before"][untouched])
            assert torch.equal(s["momentum_after"][untouched], s["momentum_before"][untouched])
            assert not torch.equal(s["weight_after"][index], s["weight_before"][index])
        # Together the ranks use max(floor(rate * classes), positives) centres (the 101 classes are one block),
        # the very set one rank alone draws: the negatives do not depend on the world size.
        sampled = torch.cat(global_index)
        assert sampled.numel() == max(int(SAMPLE_RATE * SAMPLED_CLASSES), torch.unique(labels).numel())
        assert torch.equal(sampled, active_classes(1, 0, SAMPLED_CLASSES, SAMPLE_RATE, labels, 0, SAMPLED_CLASSES))
        # The loss equals the full-softmax reference restricted to the sampled classes.
        if step == 0:
            current = weight
        else:  # the reference must use the weights as the first step left them
            current = torch.cat([got["steps"][1]["weight_before"] for got in results])
        remapped = torch.searchsorted(sampled, labels)
        ref_loss, _, _ = reference(embeddings, remapped, current[sampled], MARGINS["arcface"])
        for got in results:
            torch.testing.assert_close(got["steps"][step]["loss"], ref_loss, atol=1e-5, rtol=1e-5)


def _bad_label_worker(rank, world_size, num_classes):
    head = PartialFC(DIM, num_classes, 1.0, MARGINS["arcface"], seed=0)
    labels = torch.zeros(PER_RANK, dtype=torch.long)
    if rank == 1:
        labels[2] = num_classes  # one rank's data is bad; the other's is fine
    head(torch.randn(PER_RANK, DIM), labels)


def test_label_out_of_range_fails_on_every_rank_without_hanging():
    with pytest.raises(RankFailed) as failure:
        run_ranks(2, _bad_label_worker, 7, timeout=120)
    errors = failure.value.errors
    assert set(errors) == {0, 1}
    for text in errors.values():
        assert "label 7 is outside [0, 7)" in text and "still running" not in text


def test_sample_rate_outside_range_rejected():
    for rate in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="sample_rate"):
            PartialFC(DIM, 10, rate, MARGINS["arcface"], rank=0, world_size=1)


def arcface_torch_reported_loss(embeddings, labels, weight, margin):
    """The loss value as arcface_torch's DistCrossEntropyFunc computes it: softmax in fp32, the target
    probability clamped at 1e-30, then -log, averaged."""
    cos = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
    probs = margin.logits(cos, torch.arange(len(labels)), labels).softmax(dim=1)
    return -probs[torch.arange(len(labels)), labels].clamp_min(1e-30).log().mean()


def _anti_parallel_worker(rank, world_size, margin_name, embeddings, labels, weight):
    head = build_head(rank, world_size, len(weight), MARGINS[margin_name], 1.0, weight)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    local = embeddings[mine].clone().requires_grad_(True)
    loss = head(local, labels[mine])
    loss.backward()
    rows, weight_grad = head.take_gradients()
    return {"loss": loss.detach(), "emb_grad": local.grad, "weight_grad": weight_grad, "start": head.class_start,
            "count": head.num_local}


@pytest.mark.parametrize("margin_name", ["arcface", "cosface"])
def test_reported_loss_is_arcface_torchs_on_an_anti_parallel_sample_and_the_gradient_the_true_one(margin_name):
    """A sample pointing away from its centre has a target probability below 1e-30: arcface_torch reports its
    loss as -ln(1e-30) = 69.08; ds_face reports the same value, and still back-propagates the true gradient."""
    world_size, num_classes = 2, 10
    embeddings, labels, weight = make_problem(world_size, num_classes, seed=5)
    embeddings[0] = -weight[labels[0]] * 10  # anti-parallel: theta = pi, theta + m passes pi
    margin = MARGINS[margin_name]
    arcface_torch_loss, ref_emb_grad, ref_weight_grad = reference(embeddings, labels, weight, margin)
    cos = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
    true_loss = F.cross_entropy(margin.logits(cos, torch.arange(len(labels)), labels), labels)
    assert arcface_torch_loss < true_loss * 0.95, "the case must be one where the clamp changes the value"
    results = run_ranks(world_size, _anti_parallel_worker, margin_name, embeddings, labels, weight)
    for rank, got in enumerate(results):
        torch.testing.assert_close(got["loss"], arcface_torch_loss, atol=1e-4, rtol=1e-5)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        torch.testing.assert_close(got["emb_grad"] / world_size, ref_emb_grad[rows], atol=1e-5, rtol=1e-5)
        start, count = got["start"], got["count"]
        torch.testing.assert_close(got["weight_grad"], ref_weight_grad[start:start + count], atol=1e-5, rtol=1e-5)


def test_hash64_gives_splitmix64s_bits():
    """The sampler's torch hash (int64 products that wrap) equals the numpy uint64 splitmix64 of the seeds."""
    keys = torch.arange(0, 2**40, 2**40 // 5003, dtype=torch.int64)
    got = hash64(7, 2**50 + 3, keys).numpy().view("uint64")
    assert (got == splitmix64(mix(7, 2**50 + 3, keys.numpy()))).all()


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5, 0.97])
def test_negatives_are_the_same_centres_on_any_world_size(rate):
    """DESIGN.md invariant 8: the classes a micro-step uses are a function of (seed, position, labels) alone.
    Over 2.5 blocks of classes, the union of every rank's draw is the same set for 1, 2, 3 and 7 ranks; it
    holds every positive, max(floor(rate * block), positives in it) classes of each block, and another
    position draws another set."""
    classes = 2 * BLOCK + BLOCK // 2
    labels = torch.cat([torch.randint(0, classes, (200,), generator=torch.Generator().manual_seed(5)),
                        torch.arange(BLOCK - 40, BLOCK + 40)])  # positives on both sides of a block edge
    drawn = {}
    for world_size in (1, 2, 3, 7):
        parts = []
        for rank in range(world_size):
            start, count = class_shard(classes, rank, world_size)
            index = active_classes(11, 1234, classes, rate, labels, start, count)
            assert torch.equal(index, torch.unique(index)) and (index >= 0).all() and (index < count).all()
            parts.append(index + start)
        drawn[world_size] = torch.cat(parts)
    assert all(torch.equal(drawn[1], other) for other in drawn.values())
    assert set(labels.tolist()) <= set(drawn[1].tolist())
    for block in range(3):
        lo, size = block * BLOCK, min(BLOCK, classes - block * BLOCK)
        held = torch.unique(labels[(labels >= lo) & (labels < lo + size)]).numel()
        in_block = ((drawn[1] >= lo) & (drawn[1] < lo + size)).sum().item()
        assert in_block == max(int(rate * size), held)
    assert not torch.equal(drawn[1], active_classes(11, 1235, classes, rate, labels, 0, classes))


def test_initial_centres_are_the_same_on_any_world_size():
    """A class starts from the same centre however the classes are split, block by block."""
    classes, dim = BLOCK + 300, 4

    def slice_of(start, count):
        out = torch.empty(count, dim)
        initial_rows(3, classes, dim, start, count, lambda row, values: out[row:row + len(values)].copy_(values))
        return out

    whole = slice_of(0, classes)
    for world_size in (2, 3):
        assert torch.equal(torch.cat([slice_of(*class_shard(classes, r, world_size)) for r in range(world_size)]),
                           whole)
    assert abs(whole.std().item() - 0.01) < 1e-3
