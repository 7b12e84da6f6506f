"""IResNet backbones, checkpoint-compatible with InsightFace arcface_torch.

Compatibility promise: for the standard widths (64, 128, 256, 512) the module
tree, parameter/buffer names, shapes, initialisation and forward order are
identical to ``recognition/arcface_torch/backbones/iresnet.py`` (iresnet18 ..
iresnet200). A ``model.pt`` from the arcface_torch model zoo therefore loads
with ``load_state_dict(strict=True)`` and yields the same embeddings for a
112x112 input.

Deliberate differences, none of which touch the state_dict:
  * no ``fp16`` autocast flag: precision is DeepSpeed's job, so the fc simply
    runs in whatever dtype the module has been cast to;
  * ``widths`` makes the stage widths configurable (for tiny CPU test models);
  * optional per-block gradient checkpointing (non-reentrant) in training.
"""
import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

BN_EPS = 1e-5


class _StatsDtypeBatchNorm:
    """BatchNorm whose affine weights follow the running statistics' dtype.

    DeepSpeed casts parameters to fp16/bf16 but keeps buffers (the running
    statistics) in fp32. PyTorch's batch_norm accepts a 16-bit input with fp32
    weights and statistics, but not 16-bit weights with fp32 statistics, so the
    weights are upcast here (a no-op in fp32). Same keys, same maths as nn.BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        dtype = self.running_mean.dtype
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight.to(dtype),
                            self.bias.to(dtype), self.training, self.momentum, self.eps)


class BatchNorm2d(_StatsDtypeBatchNorm, nn.BatchNorm2d):
    pass


class BatchNorm1d(_StatsDtypeBatchNorm, nn.BatchNorm1d):
    pass


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation style block: bn1-conv1-bn2-prelu-conv2(stride)-bn3 (+ shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.bn1 = BatchNorm2d(cin, eps=BN_EPS)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = BatchNorm2d(cout, eps=BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)  # arcface_torch strides in the 2nd conv
        self.bn3 = BatchNorm2d(cout, eps=BN_EPS)
        self.downsample = downsample  # None -> no keys, as in the reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


@contextlib.contextmanager
def _keep_buffers(module: nn.Module):
    """Undo buffer changes made while a checkpointed block is recomputed.

    Recomputation re-runs BatchNorm in training mode, which would update its
    running stats (and num_batches_tracked) a second time per step.
    """
    saved = [b.detach().clone() for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, old in zip(module.buffers(), saved):
                buf.copy_(old)


class IResNet(nn.Module):
    fc_scale = 7 * 7  # spatial size left after four stride-2 stages on 112x112

    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        widths: Sequence[int] = (64, 128, 256, 512),
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"need 4 stages, got layers={layers} widths={widths}")
        self.gradient_checkpointing = gradient_checkpointing

        # Stem at stride 1; its width equals the first stage's width (64 in the reference).
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = BatchNorm2d(widths[0], eps=BN_EPS)
        self.prelu = nn.PReLU(widths[0])

        cin = widths[0]
        for i, (n_blocks, cout) in enumerate(zip(layers, widths), start=1):
            setattr(self, f"layer{i}", self._make_stage(cin, cout, n_blocks))
            cin = cout

        self.bn2 = BatchNorm2d(cin, eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(cin * self.fc_scale, embedding_size)
        self.features = BatchNorm1d(embedding_size, eps=BN_EPS)

        # arcface_torch init: convs N(0, 0.1), BN2d affine = (1, 0); fc and the
        # BatchNorm1d keep PyTorch defaults.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The embedding BN has a fixed unit scale (only its bias is learned).
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

    @staticmethod
    def _make_stage(cin: int, cout: int, n_blocks: int) -> nn.Sequential:
        # Every stage opens with stride 2, so its first block always needs a projection shortcut.
        downsample = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size=1, stride=2, bias=False),
            BatchNorm2d(cout, eps=BN_EPS),
        )
        blocks = [IBasicBlock(cin, cout, stride=2, downsample=downsample)]
        blocks += [IBasicBlock(cout, cout) for _ in range(n_blocks - 1)]
        return nn.Sequential(*blocks)

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        use_ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in stage:
            if use_ckpt:
                x = checkpoint(
                    block, x, use_reentrant=False,
                    context_fn=lambda b=block: (contextlib.nullcontext(), _keep_buffers(b)),
                )
            else:
                x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self._run_stage(stage, x)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))
