"""Tests for ds_face.backbones (IResNet, arcface_torch-compatible).

The expected key counts, shapes and parameter counts below are derived by
hand from InsightFace's recognition/arcface_torch/backbones/iresnet.py, not
from our implementation:

State_dict keys
  stem:   conv1.weight (1) + bn1 (weight, bias, running_mean, running_var,
          num_batches_tracked = 5) + prelu.weight (1)                  =  7
  block:  bn1 (5) + conv1 (1) + bn2 (5) + prelu (1) + conv2 (1) + bn3 (5) = 18
  downsample (first block of each of the 4 stages, all have stride 2):
          downsample.0.weight (1) + downsample.1 BN (5)                 =  6
  tail:   bn2 (5) + fc weight/bias (2) + features BN1d (5)              = 12
  total = 7 + 18 * sum(layers) + 4 * 6 + 12 = 43 + 18 * sum(layers)
  r18: 43 + 18*8 = 187, r34: 43 + 18*16 = 331, r50: 43 + 18*24 = 475,
  r100: 43 + 18*49 = 925, r200: 43 + 18*98 = 1807.

Parameters (widths c = 64, 128, 256, 512; cin = input width of a stage)
  stem:   3*64*9 + 2*64 + 64                                   = 1,920
  first block of a stage: bn1 2*cin + conv1 9*cin*c + bn2 2c + prelu c
          + conv2 9c^2 + bn3 2c + downsample (cin*c + 2c)
          = 2cin + 10*cin*c + 9c^2 + 7c
  other blocks: 18c^2 + 7c
  tail:   bn2 2*512 + fc 512*49*512 + 512 + features 2*512     = 12,847,616
  (features.weight is counted: it is a frozen nn.Parameter in the reference)
  r50  [3, 4, 14, 3]  -> 43,590,848
  r100 [3, 13, 30, 3] -> 65,156,160
"""
import functools
import io

import pytest
import torch

from ds_face.backbones import BACKBONES, get_backbone

IMG = 112


@functools.lru_cache(maxsize=None)
def _built(name):
    """Default-config model, shared by the read-only structure tests."""
    torch.manual_seed(0)
    return get_backbone(name)


# ---------------------------------------------------------------- layout

R50_SHAPES = {
    "conv1.weight": (64, 3, 3, 3),
    "bn1.running_mean": (64,),
    "prelu.weight": (64,),
    "layer1.0.bn1.weight": (64,),
    "layer1.0.conv1.weight": (64, 64, 3, 3),
    "layer1.0.downsample.0.weight": (64, 64, 1, 1),
    "layer1.0.downsample.1.running_var": (64,),
    "layer1.2.conv2.weight": (64, 64, 3, 3),
    "layer2.0.bn1.bias": (64,),
    "layer2.0.conv1.weight": (128, 64, 3, 3),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.3.prelu.weight": (128,),
    "layer3.0.bn1.weight": (128,),
    "layer3.13.conv2.weight": (256, 256, 3, 3),
    "layer3.13.bn3.bias": (256,),
    "layer3.13.bn2.num_batches_tracked": (),
    "layer4.0.downsample.0.weight": (512, 256, 1, 1),
    "layer4.0.downsample.1.weight": (512,),
    "layer4.2.bn3.running_var": (512,),
    "layer4.2.prelu.weight": (512,),
    "bn2.weight": (512,),
    "bn2.running_var": (512,),
    "fc.weight": (512, 512 * 7 * 7),
    "fc.bias": (512,),
    "features.weight": (512,),
    "features.bias": (512,),
    "features.running_mean": (512,),
    "features.running_var": (512,),
    "features.num_batches_tracked": (),
}

# Keys that must NOT exist in the reference layout.
R50_ABSENT = [
    "conv1.bias",  # convs have no bias
    "layer1.1.downsample.0.weight",  # only the first block of a stage projects
    "layer3.14.conv1.weight",  # layer3 has 14 blocks (0..13)
    "layer4.3.bn1.weight",  # layer4 has 3 blocks
    "layer1.0.prelu.bias",
]


def test_r50_state_dict_matches_arcface_torch_layout():
    sd = _built("r50").state_dict()
    assert len(sd) == 475
    for key, shape in R50_SHAPES.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    for key in R50_ABSENT:
        assert key not in sd, key
    assert sd["features.num_batches_tracked"].dtype == torch.long


@pytest.mark.parametrize(
    "name,n_keys", [("r18", 187), ("r34", 331), ("r50", 475), ("r100", 925), ("r200", 1807)]
)
def test_key_counts(name, n_keys):
    assert len(_built(name).state_dict()) == n_keys


@pytest.mark.parametrize("name,n_params", [("r50", 43_590_848), ("r100", 65_156_160)])
def test_param_counts(name, n_params):
    assert sum(p.numel() for p in _built(name).parameters()) == n_params


# ---------------------------------------------------------------- loading


def test_strict_round_trip_gives_identical_embeddings():
    torch.manual_seed(1)  # r18: the same blocks and BatchNorms as r50 (whose names are checked above), 3x cheaper
    src = get_backbone("r18").train()
    with torch.no_grad():  # populate BN running stats so they are not defaults
        src(torch.randn(4, 3, IMG, IMG))
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)

    torch.manual_seed(2)
    dst = get_backbone("r18").eval()
    src.eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert not torch.equal(src(x), dst(x))  # different init: loading must matter
        dst.load_state_dict(torch.load(buf, weights_only=True), strict=True)
        out_src, out_dst = src(x), dst(x)
    assert torch.isfinite(out_src).all()
    assert torch.equal(out_src, out_dst)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("name", ["r_tiny", "r18"])
def test_output_shape(name):
    model = get_backbone(name).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, IMG, IMG)).shape == (2, 512)


def test_embedding_size_is_configurable():
    model = get_backbone("r_tiny", embedding_size=128).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, IMG, IMG)).shape == (3, 128)
    sd = model.state_dict()
    assert sd["fc.weight"].shape == (128, 64 * 7 * 7)  # r_tiny's last width is 64
    assert sd["features.weight"].shape == (128,)


def test_r_tiny_keeps_module_names():
    tiny = set(get_backbone("r_tiny").state_dict())
    r18 = set(_built("r18").state_dict())
    # r_tiny has 1 block per stage; every key it has exists in r18 too.
    assert tiny <= r18
    assert "layer4.0.downsample.1.running_mean" in tiny


def test_runs_in_cast_dtype():
    model = get_backbone("r_tiny").to(torch.bfloat16).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, IMG, IMG, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 512)


def test_features_weight_frozen_at_one():
    model = get_backbone("r_tiny").train()
    assert model.features.weight.requires_grad is False
    assert torch.all(model.features.weight == 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3, IMG, IMG)).pow(2).sum().backward()
        opt.step()
    assert model.features.weight.grad is None
    assert torch.all(model.features.weight == 1.0)
    assert model.features.bias.grad is not None  # the bias still learns


# ---------------------------------------------------------------- checkpointing


def _train_step(checkpointing):
    torch.manual_seed(0)
    model = get_backbone("r_tiny", dropout=0.2, gradient_checkpointing=checkpointing).train()
    x = torch.randn(4, 3, IMG, IMG)
    target = torch.randn(4, 512)
    out = model(x)
    (out * target).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, out.detach(), grads


def test_gradient_checkpointing_matches_plain():
    plain, out_a, grads_a = _train_step(False)
    ckpt, out_b, grads_b = _train_step(True)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-6, msg=name)
    # Recomputation must not update BatchNorm running stats a second time.
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)


def test_gradient_checkpointing_recomputes_only_in_training():
    model = get_backbone("r_tiny", gradient_checkpointing=True)
    calls = []
    # A pre-hook: non-reentrant recompute stops early, before a post-hook would fire.
    model.layer2[0].register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, IMG, IMG)

    model.train()
    model(x).sum().backward()
    assert len(calls) == 2  # forward + recompute during backward

    calls.clear()
    model.eval()
    model(x).sum().backward()
    assert len(calls) == 1


# ---------------------------------------------------------------- registry


def test_registry_names():
    assert set(BACKBONES) == {"r18", "r34", "r50", "r100", "r200", "r_tiny"}


def test_unknown_name_raises():
    with pytest.raises(ValueError) as info:
        get_backbone("r42")
    msg = str(info.value)
    assert "r42" in msg
    for name in BACKBONES:
        assert name in msg
