"""The method: bank updates (ema exact, grad = an autograd step), calibration, negatives, NPID."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgessl.config import MethodConfig
from edgessl.losses import instance_loss, sqrtkl_loss
from edgessl.methods import PRESETS, MemDistill


class TinyBackbone(nn.Module):
    """A 2-layer stand-in with BatchNorm (so train/eval mode and buffers matter)."""

    feature_dim = 6

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.conv(x)).relu().mean((2, 3))


def make(n=20, **kw):
    torch.manual_seed(0)
    return MemDistill(TinyBackbone(), n, MethodConfig(head_dims=[8, 4], **kw))


def test_bank_rows_start_unit_norm():
    m = make()
    assert m.bank.shape == (20, 4)
    assert torch.allclose(m.bank.norm(dim=1), torch.ones(20))


def test_ema_update_exact():
    m = make(cutmix_prob=0.0, bank_update="ema", bank_momentum=0.5)
    before = m.bank.clone()
    idx = torch.tensor([3, 7, 11])
    out = m(torch.randn(3, 3, 8, 8), idx)
    m.update(out)
    expected = F.normalize(0.5 * before[idx] + 0.5 * out["z"], dim=1)
    assert torch.equal(m.bank[idx], expected)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(m.bank[untouched], before[untouched])


@pytest.mark.parametrize("negatives,cutmix,weight", [("all", 0.0, 20.0), (5, 0.0, 20.0), ("all", 1.0, 5.0),
                                                     (5, 1.0, 0.0)])
def test_grad_update_equals_autograd_step(negatives, cutmix, weight):
    """W <- normalise(W - (1 - m) tau dL/dW), dL/dW by autograd of the batch-summed loss."""
    m = make(bank_update="grad", negatives=negatives, cutmix_prob=cutmix, sqrtkl_weight=weight,
             temperature=0.2, bank_momentum=0.5)
    torch.manual_seed(5)
    idx = torch.tensor([0, 4, 9, 13])
    out = m(torch.randn(4, 3, 8, 8), idx)
    before = m.bank.clone()
    m.update(out)

    bank = before.clone().requires_grad_(True)
    cols = out["cols"] if out["cols"] is not None else torch.arange(20)
    cos = out["z"] @ bank[cols].T
    loss = instance_loss(cos, out["targets"], 0.2, out["targets_b"], out["lam"])
    if weight:
        loss = loss + weight * sqrtkl_loss(cos, 1.0)
    (grad,) = torch.autograd.grad(loss * 4, bank)  # batch sum = B x batch mean
    rows = cols.unique()
    expected = before.clone()
    expected[rows] = F.normalize(before[rows] - 0.5 * 0.2 * grad[rows], dim=1)
    assert torch.allclose(m.bank, expected, atol=1e-6)
    assert not torch.allclose(m.bank, before)


def test_grad_update_moves_target_row_like_npid():
    """METHOD.md: the target row moves by (1 - m)(1 - p_i) z_i before normalisation."""
    m = make(bank_update="grad", sqrtkl_weight=0.0, cutmix_prob=0.0, temperature=0.5, bank_momentum=0.5)
    idx = torch.tensor([2, 5])
    out = m(torch.randn(2, 3, 8, 8), idx)
    rows, grad = m.bank_gradient(out)
    p = torch.softmax(out["cosines"] / 0.5, 1)
    for b, i in enumerate(idx.tolist()):
        target_move = -0.5 * 0.5 * grad[i]
        pushed = sum(p[ob, i] * out["z"][ob] for ob in range(2) if idx[ob] != i)
        assert torch.allclose(target_move, 0.5 * ((1 - p[b, i]) * out["z"][b] - pushed), atol=1e-6)


def test_calibrated_init_fills_every_row_and_equals_forward():
    m = make()
    images = torch.randn(20, 3, 8, 8)
    chunks = torch.arange(20).tensor_split(3)  # 7, 7, 6
    bn_before = {k: v.clone() for k, v in m.named_buffers() if k != "bank"}
    m.calibrate_bank((images[c], c) for c in chunks)
    for k, v in m.named_buffers():
        if k in bn_before:
            assert torch.equal(v, bn_before[k]), f"calibration changed buffer {k}"
    m.train()
    with torch.no_grad():
        direct = torch.cat([m.embed(images[c]) for c in chunks])
    assert torch.equal(m.bank, direct)


def test_calibrated_init_refuses_to_leave_rows_empty():
    m = make()
    with pytest.raises(RuntimeError, match="unfilled"):
        m.calibrate_bank([(torch.randn(4, 3, 8, 8), torch.arange(4))])


def test_sampled_negatives_score_batch_rows_then_k():
    m = make(negatives=5, cutmix_prob=0.0)
    idx = torch.tensor([1, 2, 3])
    out = m(torch.randn(3, 3, 8, 8), idx)
    assert out["cosines"].shape == (3, 8)
    assert torch.equal(out["cols"][:3], idx)
    assert torch.equal(out["targets"], torch.arange(3))
    assert torch.allclose(out["cosines"], out["z"] @ m.bank[out["cols"]].T)


def test_full_softmax_scores_every_row():
    m = make(cutmix_prob=0.0)
    out = m(torch.randn(3, 3, 8, 8), torch.tensor([4, 0, 19]))
    assert out["cosines"].shape == (3, 20)
    assert torch.equal(out["targets"], torch.tensor([4, 0, 19]))


def test_cutmix_ema_updates_each_row_once():
    m = make(cutmix_prob=1.0, bank_update="ema")
    torch.manual_seed(11)
    idx = torch.tensor([0, 1, 2, 3, 4])
    before = m.bank.clone()
    out = m(torch.randn(5, 3, 8, 8), idx)
    assert out["perm"] is not None and sorted(out["perm"].tolist()) == [0, 1, 2, 3, 4]
    m.update(out)
    rows = idx if out["lam"] >= 0.5 else idx[out["perm"]]
    assert torch.equal(m.bank[rows], F.normalize(0.5 * before[rows] + 0.5 * out["z"], dim=1))


def test_loss_parts_and_gradients_reach_every_parameter():
    m = make(cutmix_prob=1.0, sqrtkl_weight=20.0)
    out = m(torch.randn(6, 3, 8, 8), torch.arange(6))
    expected = out["parts"]["loss_id"] + 20.0 * out["parts"]["loss_sqrtkl"]
    assert torch.allclose(out["loss"].detach(), expected)
    out["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_npid_preset_turns_every_improvement_off():
    cfg = MethodConfig(**PRESETS["npid"])
    assert (cfg.bank_init, cfg.bank_update, cfg.sqrtkl_weight, cfg.cutmix_prob) == ("random", "ema", 0.0, 0.0)
