"""Two-view baselines and the supervised reference: losses against loops and exact values,
BYOL's target update, and each method end to end in the shared trainer."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from edgessl import EdgesslError, checkpoint, create_backbone
from edgessl.config import MethodConfig
from edgessl.losses import byol_loss, ntxent_loss
from edgessl.methods import METHODS
from edgessl.methods.byol import BYOL
from edgessl.train import pretrain


def naive_ntxent(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1).tolist()
    n, b, total = len(z), len(z1), 0.0
    for i in range(n):
        pos = (i + b) % n
        sims = {j: sum(a * c for a, c in zip(z[i], z[j])) / t for j in range(n) if j != i}
        total += -sims[pos] + math.log(sum(math.exp(v) for v in sims.values()))
    return total / n


def test_ntxent_matches_loop():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    assert ntxent_loss(z1, z2, 0.2).item() == pytest.approx(naive_ntxent(z1, z2, 0.2), rel=1e-5)


def test_ntxent_exact_values():
    e = torch.eye(2)
    # view e1: positive e1 (cos 1), negatives e2, e2 (cos 0): -1/t + log(e^(1/t) + 2)
    t = 0.5
    assert ntxent_loss(e, e, t).item() == pytest.approx(-1 / t + math.log(math.exp(1 / t) + 2), abs=1e-6)
    assert ntxent_loss(torch.ones(1, 3), torch.ones(1, 3), 0.1).item() == pytest.approx(0.0, abs=1e-6)


def test_byol_loss_exact_and_stop_gradient():
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    t = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]], requires_grad=True)
    assert byol_loss(p, t).item() == pytest.approx((0 + 2 + 4) / 3, abs=1e-6)
    byol_loss(p, t).backward()
    assert t.grad is None and p.grad is not None


def test_byol_momentum_schedule_and_ema():
    class Tiny(torch.nn.Module):
        feature_dim = 4

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)

        def forward(self, x):
            return self.lin(x.mean((2, 3)))

    m = BYOL(Tiny(), 10, MethodConfig(head_dims=[8, 4], predictor_dims=[8, 4], byol_momentum=0.9))
    assert m.momentum(0.0) == pytest.approx(0.9) and m.momentum(1.0) == pytest.approx(1.0)
    assert m.momentum(0.5) == pytest.approx(0.95)
    with torch.no_grad():
        m.backbone.lin.weight.add_(1.0)
    before = m.target_backbone.lin.weight.clone()
    m.update({}, 0.0)
    expected = 0.9 * before + 0.1 * m.backbone.lin.weight
    assert torch.allclose(m.target_backbone.lin.weight, expected)
    assert not any(p.requires_grad for p in m.target_backbone.parameters())


@pytest.mark.parametrize("method", ["simclr", "byol", "supervised"])
def test_each_method_trains_in_the_shared_trainer(tiny_npz, tmp_path, method):
    from edgessl.methods import PRESETS

    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 2},
                      method={"name": method, **PRESETS[method], "head_dims": [32, 16], "predictor_dims": [32, 16]})
    out = pretrain(cfg, tmp_path / "run", log=lambda *_: None)
    assert out["method"] == method and out["steps"] == 8 and math.isfinite(out["final_loss"])


def test_byol_resume_is_bit_exact(tiny_npz, tmp_path):
    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 2},
                      method={"name": "byol", "head_dims": [32, 16], "predictor_dims": [32, 16]})
    pretrain(cfg, tmp_path / "full", log=lambda *_: None)
    pretrain(cfg, tmp_path / "cut", stop_at_step=3, log=lambda *_: None)
    pretrain(cfg, tmp_path / "cut", resume=True, log=lambda *_: None)
    a, b = (checkpoint.load(tmp_path / r / "checkpoint.pt")["model"] for r in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a) and any(k.startswith("target_backbone") for k in a)
    assert (tmp_path / "full" / "steps.csv").read_text() == (tmp_path / "cut" / "steps.csv").read_text()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_reports_its_parts_and_trains_every_parameter(method):
    """Over the registry: finite loss, exactly the declared loss parts (the metrics.csv columns),
    and a finite, non-zero gradient in every trainable parameter."""
    from edgessl.methods import create_method, loss_parts

    torch.manual_seed(0)
    cfg = MethodConfig(**{**METHODS[method].preset, "head_dims": [32, 16], "predictor_dims": [32, 16],
                          "negatives": "all"})  # (as the recipe resolves "auto" for 12 images)
    model = create_method(method, create_backbone("mobilenetv3_small_050", 16), 12, cfg, num_classes=3).train()
    views = model.num_views
    out = model(torch.randn(6 * views, 3, 16, 16), torch.arange(6), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert torch.isfinite(out["loss"]) and set(out["parts"]) == set(loss_parts(method))
    out["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_nan_stops_every_method_before_its_state_changes(method, tiny_npz, monkeypatch):
    """The trainer's NaN stop, for each method: the weights and the method's state (the bank, BYOL's
    target) untouched. (BatchNorm's running statistics have seen the forward pass; the run stops
    and the last checkpoint is what --resume continues from.) run.sync_every 1, the CPU's value: a GPU
    reads the loss every few steps, and test_train.py covers that stop."""
    from edgessl.train import build, train_step

    s = build(tiny_config(f"npz:{tiny_npz}", method={"name": method, **METHODS[method].preset,
                                                     "head_dims": [32, 16], "predictor_dims": [32, 16]},
                          run={"sync_every": 1}))
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    real = type(s.model.backbone).forward
    monkeypatch.setattr(type(s.model.backbone), "forward", lambda self, x: real(self, x) * float("nan"))
    with pytest.raises(EdgesslError, match="loss is nan at step 3"):
        train_step(s, torch.arange(8), 1e-3, 3)
    for k, v in s.model.state_dict().items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(v, before[k]), k
