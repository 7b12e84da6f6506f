"""Margins against their closed forms, and the safe ArcFace branch."""
import math

import pytest
import torch

from ds_face.head import Margin


def test_arcface_adds_angle():
    cos = torch.tensor([0.9, 0.5, 0.0, -0.5])
    got = Margin.arcface(0.5).target_logit(cos)
    assert torch.allclose(got, torch.cos(torch.arccos(cos) + 0.5), atol=1e-6)


def test_cosface_subtracts():
    cos = torch.tensor([0.9, -0.3])
    assert torch.allclose(Margin.cosface(0.35).target_logit(cos), cos - 0.35)


def test_combined_margin_closed_form():
    cos = torch.tensor([0.95, 0.6, 0.1], dtype=torch.float64)
    margin = Margin(s=30, m1=1.2, m2=0.3, m3=0.2)
    expected = torch.cos(1.2 * torch.arccos(cos) + 0.3) - 0.2
    assert torch.allclose(margin.target_logit(cos), expected, atol=1e-6)


def test_safe_branch_past_pi_keeps_target_decreasing():
    margin = Margin.arcface(0.5)
    cos = torch.linspace(-1.0, 1.0, 2001)
    target = margin.target_logit(cos)
    # theta + m > pi happens for cos < cos(pi - m): there cos(theta + m) would rise again.
    past = cos < math.cos(math.pi - 0.5)
    assert past.any()
    assert torch.allclose(target[past], cos[past] - 0.5 * math.sin(0.5), atol=1e-6)
    assert (target.diff() >= 0).all(), "target logit must not increase with the angle"
    assert (target <= cos + 1e-6).all(), "a margin never makes the target easier"


def test_gradient_is_the_formula_derivative():
    cos = torch.tensor([0.7, 0.2], requires_grad=True)
    Margin.arcface(0.5).target_logit(cos).sum().backward()
    sin = torch.sqrt(1 - cos.detach() ** 2)
    # d/dc cos(arccos(c) + m) = cos(m) + c * sin(m) / sqrt(1 - c^2)
    expected = math.cos(0.5) + cos.detach() * math.sin(0.5) / sin
    assert torch.allclose(cos.grad, expected, atol=1e-5)


def test_gradient_finite_at_the_ends():
    cos = torch.tensor([1.0, -1.0, 0.999999], requires_grad=True)
    Margin(m1=1.1, m2=0.3, m3=0.1).target_logit(cos).sum().backward()
    assert torch.isfinite(cos.grad).all()


def test_logits_scale_only_target_entries_get_margin():
    cos = torch.tensor([[0.5, 0.2, -0.1], [0.3, 0.9, 0.0]])
    margin = Margin.cosface(0.35, s=10)
    logits = margin.logits(cos, torch.tensor([0, 1]), torch.tensor([2, 1]))
    expected = cos * 10
    expected[0, 2] = (-0.1 - 0.35) * 10
    expected[1, 1] = (0.9 - 0.35) * 10
    assert torch.allclose(logits, expected)


@pytest.mark.parametrize("kwargs", [dict(s=0), dict(m1=0), dict(m2=-0.1), dict(m2=2.0)])
def test_bad_margins_rejected(kwargs):
    with pytest.raises(ValueError):
        Margin(**kwargs)
