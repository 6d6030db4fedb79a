"""The method: bank updates (ema exact, grad = docs/method.md's closed form), calibration, negatives, NPID."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgessl.config import MethodConfig
from edgessl.methods import PRESETS
from edgessl.methods.memdistill import MemDistill

pytestmark = pytest.mark.numeric  # run again with the CPU capped to AVX2 (make test-avx2)


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
    kw.setdefault("negatives", "all")  # as the recipe resolves "auto" for 20 images
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
    expected = F.normalize(0.5 * before[idx] + 0.5 * out["bank"].z, dim=1)
    assert torch.equal(m.bank[idx], expected)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(m.bank[untouched], before[untouched])


def closed_form_bank_gradient(step, cfg):
    """docs/method.md, written out: dL/dc_bk = (p_bk - y_bk) / tau + lambda q_bk (a_bk - <q_b, a_b>) / T with
    p = softmax(c / tau), y the (CutMix-mixed) one-hot target, q = softmax(c / T), a = log q - log u
    (SqrtKL's log ratio); dL/dw_k = sum_b dL/dc_bk z_b. Returns (C, d)."""
    c, z = step.cosines, step.z
    y = F.one_hot(step.targets, c.shape[1]).float()
    if step.targets_b is not None:
        y = step.lam * y + (1 - step.lam) * F.one_hot(step.targets_b, c.shape[1]).float()
    g = (torch.softmax(c / cfg.temperature, 1) - y) / cfg.temperature
    if cfg.sqrtkl_weight > 0:
        log_q = torch.log_softmax(c / cfg.sqrtkl_temperature, 1)
        a = log_q - torch.log_softmax(c / (2 * cfg.sqrtkl_temperature), 1)
        q = log_q.exp()
        g = g + cfg.sqrtkl_weight * q * (a - (q * a).sum(1, keepdim=True)) / cfg.sqrtkl_temperature
    return g.T @ z


@pytest.mark.parametrize("negatives,cutmix,weight", [("all", 0.0, 20.0), (5, 0.0, 20.0), ("all", 1.0, 5.0),
                                                     (5, 1.0, 0.0), ("all", 1.0, 20.0)])
def test_grad_update_equals_the_closed_form_step(negatives, cutmix, weight):
    """W <- normalise(W - (1 - m) tau dL/dW) with docs/method.md's dL/dW of the batch-summed loss: every
    term of the loss (instance, CutMix mixing, SqrtKL) reaches the bank update."""
    m = make(bank_update="grad", negatives=negatives, cutmix_prob=cutmix, sqrtkl_weight=weight,
             temperature=0.2, bank_momentum=0.5)
    torch.manual_seed(5)
    idx = torch.tensor([0, 4, 9, 13])
    out = m(torch.randn(4, 3, 8, 8), idx)
    step = out["bank"]
    assert (step.perm is not None) == (cutmix > 0)
    before = m.bank.clone()
    m.update(out)

    cols = step.cols if step.cols is not None else torch.arange(20)
    grad = torch.zeros(20, 4).index_add_(0, cols, closed_form_bank_gradient(step, m.cfg))  # repeated rows add
    rows = cols.unique()
    expected = before.clone()
    expected[rows] = F.normalize(before[rows] - 0.5 * 0.2 * grad[rows], dim=1)
    assert torch.allclose(m.bank, expected, atol=1e-6)
    assert not torch.allclose(m.bank, before)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(m.bank[untouched], before[untouched])


def test_grad_update_moves_target_row_like_npid():
    """docs/method.md: the target row moves by (1 - m)(1 - p_i) z_i before normalisation."""
    m = make(bank_update="grad", sqrtkl_weight=0.0, cutmix_prob=0.0, temperature=0.5, bank_momentum=0.5)
    idx = torch.tensor([2, 5])
    step = m(torch.randn(2, 3, 8, 8), idx)["bank"]
    rows, grad = m.bank_gradient(step)
    assert torch.equal(rows, torch.arange(20))
    p = torch.softmax(step.cosines / 0.5, 1)
    for b, i in enumerate(idx.tolist()):
        target_move = -0.5 * 0.5 * grad[i]
        pushed = sum(p[ob, i] * step.z[ob] for ob in range(2) if idx[ob] != i)
        assert torch.allclose(target_move, 0.5 * ((1 - p[b, i]) * step.z[b] - pushed), atol=1e-6)


def test_eval_mode_forward_computes_no_bank_gradient():
    m = make(bank_update="grad").eval()
    assert m(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))["bank"].grad is None


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
    step = m(torch.randn(3, 3, 8, 8), idx)["bank"]
    assert step.cosines.shape == (3, 8)
    assert torch.equal(step.cols[:3], idx)
    assert torch.equal(step.targets, torch.arange(3))
    assert torch.allclose(step.cosines, step.z @ m.bank[step.cols].T)


def test_full_softmax_scores_every_row():
    m = make(cutmix_prob=0.0)
    step = m(torch.randn(3, 3, 8, 8), torch.tensor([4, 0, 19]))["bank"]
    assert step.cosines.shape == (3, 20) and step.cols is None
    assert torch.equal(step.targets, torch.tensor([4, 0, 19]))


def test_cutmix_ema_updates_each_row_once():
    m = make(cutmix_prob=1.0, bank_update="ema", bank_momentum=0.5)
    torch.manual_seed(11)
    idx = torch.tensor([0, 1, 2, 3, 4])
    before = m.bank.clone()
    out = m(torch.randn(5, 3, 8, 8), idx)
    step = out["bank"]
    assert step.perm is not None and sorted(step.perm.tolist()) == [0, 1, 2, 3, 4]
    m.update(out)
    rows = idx if step.lam >= 0.5 else idx[step.perm]
    assert torch.equal(m.bank[rows], F.normalize(0.5 * before[rows] + 0.5 * step.z, dim=1))


def test_loss_parts_and_gradients_reach_every_parameter():
    m = make(cutmix_prob=1.0, sqrtkl_weight=20.0)
    out = m(torch.randn(6, 3, 8, 8), torch.arange(6))
    expected = out["parts"]["loss_id"] + 20.0 * out["parts"]["loss_sqrtkl"]
    assert torch.allclose(out["loss"].detach(), expected)
    out["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_the_npid_preset_trains_npid():
    """NPID (Wu et al. 2018) from the preset: the loss is the plain instance cross-entropy of the
    features against the bank (no SqrtKL term, no CutMix), and the bank takes the 0.5 moving average."""
    m = make(negatives="all", **PRESETS["npid"])
    images, idx = torch.randn(5, 3, 8, 8), torch.tensor([1, 4, 9, 12, 19])
    before = m.bank.clone()
    out = m(images, idx)
    z = F.normalize(m.head(m.backbone(images)), dim=1)
    naive = F.cross_entropy(z @ before.T / m.cfg.temperature, idx)
    torch.testing.assert_close(out["loss"], naive, rtol=1e-6, atol=1e-6)  # fp32, one 20-way softmax
    assert out["bank"].perm is None
    m.update(out)
    assert torch.equal(m.bank[idx], F.normalize(0.5 * before[idx] + 0.5 * out["bank"].z, dim=1))


def test_bf16_step_scores_the_bank_in_fp32():
    """Under bf16 autocast the backbone runs in bf16, but the head, the scores, the loss and the bank
    gradient are fp32: equal to the fp32 computation from the same backbone features."""
    m = make(negatives="all")
    images, idx = torch.randn(5, 3, 8, 8), torch.tensor([1, 4, 9, 12, 19])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(images, idx)
        features = m.backbone(images)  # bf16 backbone (conv), as the step saw it
    assert features.dtype == torch.bfloat16
    step = out["bank"]
    assert step.cosines.dtype == step.grad.dtype == out["loss"].dtype == torch.float32
    z = F.normalize(m.head(features.float()), dim=1)
    bank = m.bank.clone().requires_grad_(True)
    loss = F.cross_entropy(z @ bank.T / m.cfg.temperature, idx)
    grad = torch.autograd.grad(loss, bank)[0] * 5
    torch.testing.assert_close(step.cosines, (z @ m.bank.T).detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["loss"], loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(step.grad, grad, rtol=1e-5, atol=1e-6)
    # a bf16 matmul holds a cosine near 1 in steps of 2^-8: this test can tell the two apart
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = (z @ m.bank.T).float()
    assert (rounded - step.cosines).abs().max() > 1e-4
