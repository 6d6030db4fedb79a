"""The step a CUDA graph records (edgessl.capture, train.graph_step): the eager step's numbers, nothing
read from the device inside it, and the recipe's rule. On a GPU (EDGESSL_TEST_DEVICE=cuda, as
scripts/gpu_check.py runs it) the graph itself: its replays against eager steps, and a host sync put
back into the step fails under torch.cuda.set_sync_debug_mode("error")."""
from __future__ import annotations

import os

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import make_npz, tiny_config
from edgessl import augment, capture
from edgessl.config import from_dict
from edgessl.train import build, graph_step, pretrain, train_step

pytestmark = pytest.mark.numeric  # run again with the CPU capped to AVX2 (make test-avx2)

DEVICE = os.environ.get("EDGESSL_TEST_DEVICE", "cpu")
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy}
METHODS = [{"name": "memdistill"}, {"name": "memdistill", "bank_update": "ema", "sqrtkl_weight": 1.0},
           {"name": "memdistill", "negatives": 24}, {"name": "simclr"}, {"name": "byol"}, {"name": "supervised"}]


def _ids(m: dict) -> str:
    return "-".join(f"{v}" for v in m.values())


def _setups(tmp_path, method: dict, optim: str = "adamw", capture_: bool = False, precision: str = ""):
    spec = f"npz:{make_npz(tmp_path / 'd.npz', n=48, size=16, seed=0)}"
    cfg = lambda: tiny_config(spec, method={"head_dims": [32, 16], "predictor_dims": [32, 16], **method},  # noqa: E731
                              optim={"name": optim, "batch_size": 8},
                              run={"capture": capture_, "monitor_every": 0,
                                   **({"precision": precision} if precision else {})})
    return build(cfg()), build(cfg())


def _state(s) -> dict:
    return {**{f"model.{k}": v for k, v in s.model.state_dict().items()},
            **{f"grad.{n}": p.grad for n, p in s.model.named_parameters() if p.grad is not None}}


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
@pytest.mark.parametrize("method", METHODS, ids=_ids)
def test_the_recorded_step_function_is_the_eager_step(tmp_path, method, optim):
    """graph_step through StaticStep (its tensor learning rate and progress), run eagerly, against the
    eager train_step over three steps: the same losses, weights, gradients and bank, bit for bit."""
    eager, static = _setups(tmp_path, method, optim)
    step = capture.StaticStep(lambda i, p: graph_step(static, i, p), static.optimizer, 8, static.device, graph=False)
    for g in eager.optimizer.param_groups:  # the same learning-rate arithmetic (set_lr fills a tensor in place)
        g["lr"] = torch.tensor(0.0)
    for k, lr in enumerate([1e-3, 5e-4, 2e-4]):
        idx = torch.arange(8 * k, 8 * k + 8, device=eager.device)
        torch.manual_seed(k)
        a = train_step(eager, idx, lr, k, 3)
        torch.manual_seed(k)
        b = step(idx, lr, min(1.0, (k + 1) / 3))
        assert torch.equal(b["values"], a["values"])
    sa, sb = _state(eager), _state(static)
    assert sa.keys() == sb.keys() and len(sa) > 10
    assert not [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert float(static.optimizer.param_groups[0]["lr"]) == pytest.approx(2e-4)


class _HostReads(TorchFunctionMode):
    """Fails on anything that copies a tensor's value to Python (on a GPU: a wait for the device)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise AssertionError(f"the step reads a tensor on the host: {func.__name__}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", METHODS, ids=_ids)
def test_the_recorded_step_reads_nothing_from_the_device(tmp_path, method, monkeypatch):
    """The whole step (augmentation, forward, loss, backward, optimizer, bank) with every host read of
    a tensor failing; the jitter's order is the one draw on the host, by design (edgessl.capture)."""
    _, s = _setups(tmp_path, method)
    monkeypatch.setattr(augment, "jitter_order", lambda: list(augment.JITTER_OPS))
    step = capture.StaticStep(lambda i, p: graph_step(s, i, p), s.optimizer, 8, s.device, graph=False)
    idx = torch.arange(8, device=s.device)
    step(idx, 1e-3, 0.5)  # the first step creates the optimizer's state (outside the mode: not recorded)
    with _HostReads():
        out = step.fn(step.idx, step.progress)
    assert torch.isfinite(out["values"]).all()
    with pytest.raises(AssertionError, match="reads a tensor on the host"), _HostReads():
        float(out["values"][0])  # the check can fail


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("bank_update", ["grad", "ema"])
def test_the_compiled_step_matches_eager(tmp_path, bank_update, precision):
    """graph_step compiled by torch.compile (dynamo and AOT autograd's traced graphs, run by eager
    kernels: inductor's C++ build would take minutes here, and draws other random numbers) against
    the eager function: the same losses, gradients and bank to float rounding."""
    eager, compiled = _setups(tmp_path, {"name": "memdistill", "bank_update": bank_update}, precision=precision)
    fn = torch.compile(lambda i, p: graph_step(compiled, i, p), backend="aot_eager")
    for s, f in ((eager, lambda i, p: graph_step(eager, i, p)), (compiled, fn)):
        torch.manual_seed(0)
        step = capture.StaticStep(f, s.optimizer, 8, s.device, graph=False)
        s.out = step(torch.arange(8, device=s.device), 1e-3, 0.5)
    # the losses are computed in fp32 (full_precision) from the same forward kernels: 2^-20 relative
    torch.testing.assert_close(compiled.out["values"], eager.out["values"], rtol=2**-20, atol=1e-6)
    sa, sb = _state(eager), _state(compiled)
    if precision == "fp32":
        # AOT autograd's backward may sum in another order: fp32 rounding (2^-24) over up to ~2^10
        # terms per gradient entry bounds the difference by ~2^-14 of the tensor's largest entry
        for k in sa:
            torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=2**-14 * max(1.0, sa[k].abs().max().item()), msg=k)
        return
    # bf16: each product is rounded to 8 bits (2^-8), and the traced backward rounds its intermediates
    # at other points; the error follows the gradient flowing in, so it is bounded against the largest
    # gradient of the step (8 bf16 ulps), and AdamW's first step (lr * sign(g)) moves a weight whose
    # gradient is within that noise by up to 2 * lr either way
    grads = [k for k in sa if k.startswith("grad.")]
    scale = max(sa[k].abs().max().item() for k in grads)
    for k in sa:
        atol = 2**-5 * scale if k in grads else 2 * 1e-3 + 1e-6
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=atol, msg=k)


def test_the_recipe_captures_only_where_a_graph_can_hold_the_step(tmp_path):
    cfg = lambda **s: from_dict({"data": {"spec": "npz:x"}, **s})  # noqa: E731
    cuda = torch.device("cuda")
    assert capture.why_not(cfg(), cuda, "bf16", 1) is None
    assert capture.why_not(cfg(), torch.device("cpu"), "fp32", 1) == "CUDA graphs need a CUDA device"
    assert "GradScaler" in capture.why_not(cfg(), cuda, "fp16", 1)
    assert "torchrun" in capture.why_not(cfg(), cuda, "fp32", 2)
    assert "progressive" in capture.why_not(cfg(augment={"start_size": 16}), cuda, "fp32", 1)
    assert "CutMix" in capture.why_not(cfg(method={"cutmix_prob": 1.0}), cuda, "fp32", 1)
    assert "fused" in capture.why_not(cfg(optim={"fused": False}), cuda, "fp32", 1)
    assert "memory-mapped" in capture.why_not(cfg(), cuda, "fp32", 1, mapped=True)


def test_capture_on_a_cpu_says_why_it_steps_eagerly(tmp_path):
    spec = f"npz:{make_npz(tmp_path / 'd.npz', n=40, size=16, seed=0)}"
    lines = []
    r = pretrain(tiny_config(spec, optim={"epochs": 1}, run={"capture": True, "device": "cpu"}), tmp_path / "run",
                 log=lines.append)
    assert r["steps"] == 3
    assert "capture    off: CUDA graphs need a CUDA device; eager steps" in lines
    auto = []
    pretrain(tiny_config(spec, optim={"epochs": 1}, run={"device": "cpu"}), tmp_path / "auto", log=auto.append)
    assert "capture off (a CPU)" in auto[0]


GPU = pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(), reason="a CUDA graph needs a CUDA GPU")


@GPU
@pytest.mark.parametrize("method", [m for m in METHODS if "negatives" not in m], ids=_ids)  # (sampled: random)
def test_the_graph_replays_the_eager_step(tmp_path, method):
    """On a GPU, with the augmentation made deterministic (the graph's random numbers are not eager's):
    eight steps replayed as a CUDA graph against eight eager steps from the same weights, to float
    rounding; the replays and the eager body run under set_sync_debug_mode("error")."""
    eager, graphed = _setups(tmp_path, method)
    for s in (eager, graphed):
        s.augment = lambda raw, side=0, s=s: augment.normalize(raw, s.cfg.data.mean, s.cfg.data.std)
    step = capture.StaticStep(lambda i, p: graph_step(graphed, i, p), graphed.optimizer, 8, graphed.device,
                              log=pytest.fail)
    for k in range(8):
        idx = torch.arange(8 * (k % 6), 8 * (k % 6) + 8, device=eager.device)
        torch.cuda.set_sync_debug_mode("error" if k > capture.WARMUP_STEPS else 0)  # (a capture synchronises)
        try:
            a, b = train_step(eager, idx, 1e-3, k, 8), step(idx, 1e-3, (k + 1) / 8)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        # a CUDA graph replays the kernels cuDNN picked, whose summation order may differ from eager's: TF32-size noise
        torch.testing.assert_close(b["values"], a["values"], rtol=1e-3, atol=1e-3)
    assert step.graph is not None
    sa, sb = _state(eager), _state(graphed)
    for k in sa:
        if k.startswith("model."):
            # after 8 AdamW steps of lr 1e-3 each weight moved at most ~8e-3; 1e-3 bounds the sign noise of tiny gradients
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-2, atol=1e-3, msg=k)


@GPU
def test_replays_draw_new_augmentations(tmp_path):
    """The device's random numbers advance from one replay to the next (torch.cuda.graph's RNG)."""
    _, s = _setups(tmp_path, {"name": "memdistill"})
    step = capture.StaticStep(lambda i, p: {**graph_step(s, i, p), "x": s.augment(s.train.images[i])},
                              s.optimizer, 8, s.device, log=pytest.fail)
    views = []
    for k in range(capture.WARMUP_STEPS + 3):
        step(torch.arange(8, device=s.device), 1e-3, 0.5)
        views.append(step.out["x"].clone())
    assert step.graph is not None
    assert not torch.equal(views[-1], views[-2]) and not torch.equal(views[-2], views[-3])
