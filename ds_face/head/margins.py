"""Additive angular / cosine margins applied to the target logit.

The combined margin of InsightFace, for a target cosine ``cos(theta)``:

    target = cos(m1 * theta + m2) - m3          then every logit is multiplied by s

ArcFace is (1, m2, 0), CosFace is (1, 0, m3), SphereFace-style is (m1, 0, 0).
Unlike arcface_torch, which edits the logits in place under ``no_grad`` (so the
backward pass silently treats the margin as the identity, deepinsight/insightface#2255),
this is an ordinary differentiable function: autograd differentiates exactly
the formula above.

Numerically safe branch: once ``m1 * theta + m2`` passes pi the cosine turns
back up and the margin would *reward* the wrong class. There we fall back to
the monotone ``cos(theta) - m3 - m2 * sin(m2)`` (the original ArcFace paper's
choice), so the target logit keeps decreasing as theta grows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Keeps arccos and sqrt(1 - cos^2) away from their infinite slopes at +-1.
_COS_EPS = 1e-6


@dataclass(frozen=True)
class Margin:
    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0

    def __post_init__(self):
        if self.s <= 0:
            raise ValueError(f"margin scale s must be > 0, got {self.s}")
        if self.m1 <= 0:
            raise ValueError(f"margin m1 must be > 0, got {self.m1}")
        if not 0 <= self.m2 < math.pi / 2:
            raise ValueError(f"margin m2 must be in [0, pi/2), got {self.m2}")

    @classmethod
    def arcface(cls, m: float = 0.5, s: float = 64.0) -> "Margin":
        return cls(s=s, m1=1.0, m2=m, m3=0.0)

    @classmethod
    def cosface(cls, m: float = 0.35, s: float = 64.0) -> "Margin":
        return cls(s=s, m1=1.0, m2=0.0, m3=m)

    def target_logit(self, cos: torch.Tensor) -> torch.Tensor:
        """Margin-adjusted cosine of the target class (before scaling by s)."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            return cos - self.m3
        cos = cos.clamp(-1 + _COS_EPS, 1 - _COS_EPS)
        if self.m1 == 1.0:
            # cos(theta + m2) by the addition formula: cheaper and smoother than arccos.
            sin = torch.sqrt(1.0 - cos * cos)
            shifted = cos * math.cos(self.m2) - sin * math.sin(self.m2)
            past_pi = cos < math.cos(math.pi - self.m2)
        else:
            theta = torch.arccos(cos)
            shifted = torch.cos(self.m1 * theta + self.m2)
            past_pi = self.m1 * theta + self.m2 > math.pi
        fallback = cos - self.m2 * math.sin(self.m2)
        return torch.where(past_pi, fallback, shifted) - self.m3

    def logits(self, cos: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Scaled logits from a cosine matrix whose target entries are ``(rows, cols)``.

        Out-of-place ``index_put`` keeps autograd exact: the target entries get
        the margin's derivative, every other entry the plain scale ``s``.
        """
        adjusted = self.target_logit(cos[rows, cols])
        return cos.index_put((rows, cols), adjusted) * self.s
