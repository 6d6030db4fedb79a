"""Losses against naive references, exact values, and the SqrtKL gradient identity."""
import math

import numpy as np
import pytest
import torch

from edgessl.losses import instance_loss, sqrtkl_loss

pytestmark = pytest.mark.numeric  # run again with the CPU capped to AVX2 (make test-avx2)


def naive_ce(cos, targets, tau):
    total = 0.0
    for row, t in zip(cos.tolist(), targets.tolist()):
        logits = [c / tau for c in row]
        total += -logits[t] + math.log(sum(math.exp(v) for v in logits))
    return total / len(targets)


def test_instance_loss_matches_loop():
    torch.manual_seed(0)
    cos = torch.randn(5, 7).clamp(-1, 1)
    t = torch.tensor([0, 3, 6, 2, 2])
    assert instance_loss(cos, t, 0.2).item() == pytest.approx(naive_ce(cos, t, 0.2), rel=1e-5)


def test_instance_loss_exact_value():
    # two equal logits: CE = log 2, whatever tau
    cos = torch.tensor([[0.5, 0.5]])
    assert instance_loss(cos, torch.tensor([0]), 0.1).item() == pytest.approx(math.log(2), abs=1e-6)
    # one-hot cosines, tau 1: CE = -1 + log(e + 2)
    cos = torch.tensor([[1.0, 0.0, 0.0]])
    assert instance_loss(cos, torch.tensor([0]), 1.0).item() == pytest.approx(-1 + math.log(math.e + 2), abs=1e-6)


def test_instance_loss_cutmix_mixes_targets():
    torch.manual_seed(1)
    cos = torch.randn(4, 6).clamp(-1, 1)
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 0, 1])
    mixed = instance_loss(cos, a, 0.5, b, 0.3).item()
    assert mixed == pytest.approx(0.3 * naive_ce(cos, a, 0.5) + 0.7 * naive_ce(cos, b, 0.5), rel=1e-5)


def naive_sqrtkl(cos, temperature):
    out = 0.0
    for row in cos.double().numpy():
        p = np.exp(row / temperature) / np.exp(row / temperature).sum()
        u = np.sqrt(p) / np.sqrt(p).sum()
        out += float((p * (np.log(p) - np.log(u))).sum())
    return out / cos.shape[0]


@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_sqrtkl_matches_numpy(temperature):
    torch.manual_seed(2)
    cos = torch.randn(6, 9).clamp(-1, 1)
    assert sqrtkl_loss(cos, temperature).item() == pytest.approx(naive_sqrtkl(cos, temperature), rel=1e-5)


def test_sqrtkl_exact_values():
    # uniform p: u = p, KL = 0
    assert sqrtkl_loss(torch.zeros(3, 5)).item() == pytest.approx(0.0, abs=1e-7)
    # two entries, logits (log 4, 0): p = (0.8, 0.2), u = (2/3, 1/3)
    p, u = np.array([0.8, 0.2]), np.array([2 / 3, 1 / 3])
    expected = float((p * np.log(p / u)).sum())
    assert sqrtkl_loss(torch.tensor([[math.log(4.0), 0.0]])).item() == pytest.approx(expected, abs=1e-6)


def test_sqrtkl_gradient_is_half_negative_entropy_gradient():
    """docs/method.md: with the stop-gradient, grad L_SqrtKL = 1/2 grad(-H(p))."""
    torch.manual_seed(3)
    cos = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    (g_sq,) = torch.autograd.grad(sqrtkl_loss(cos, 1.0), cos)
    p = torch.softmax(cos, 1)
    neg_entropy = (p * p.log()).sum(1).mean()
    (g_h,) = torch.autograd.grad(neg_entropy, cos)
    assert torch.allclose(g_sq.double(), 0.5 * g_h, atol=1e-6)
    assert g_h.abs().max() > 1e-3  # the identity is not the trivial 0 = 0
