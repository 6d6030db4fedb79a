"""The faster CPU backward of depthwise convolutions: the same gradients as PyTorch's, the plain
conv wherever nothing is trained (eval, no-grad, ONNX export)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import INDUCTOR_ON_AVX2
from edgessl import depthwise
from edgessl.backbones import create_backbone
from edgessl.depthwise import DepthwiseConv2d, fast_depthwise, weight_grad

pytestmark = pytest.mark.numeric  # run again with the CPU capped to AVX2 (make test-avx2)


# (input shape, kernel, stride, padding, dilation): maps under and over SMALL_MAP, strides, dilations
CASES = [((4, 8, 2, 2), 5, 1, 2, 1), ((4, 8, 4, 4), 5, 2, 2, 1), ((3, 5, 7, 6), 5, 2, 2, 1),
         ((2, 6, 9, 9), 5, 1, 2, 1), ((2, 6, 8, 8), 5, 2, 4, 2), ((2, 6, 12, 12), 5, 1, 2, 1)]


@pytest.mark.parametrize("shape,k,stride,pad,dil", CASES)
def test_weight_grad_is_autograds(shape, k, stride, pad, dil):
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.randn(c, 1, k, k, generator=g, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, None, stride, pad, dil, c)
    grad = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (expected,) = torch.autograd.grad(y, w, grad)
    got = weight_grad(x, grad, w.detach(), (stride, stride), (pad, pad), (dil, dil))
    assert got.shape == expected.shape
    # fp64 both sides, sums of at most a few thousand products: ~1e-13 apart; 1e-10 is far below any indexing error
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    small = y.shape[-1] * y.shape[-2] <= depthwise.SMALL_MAP
    assert small == (shape[-1] <= 4 or (stride == 2 and shape[-1] <= 8))  # both paths are covered


@pytest.mark.parametrize("size,downsample", [(32, 16), (64, 32)])
def test_a_switched_mobilenet_trains_like_pytorchs(size, downsample):
    torch.manual_seed(0)
    plain = create_backbone("mobilenetv3_small_050", size, downsample)
    fast = copy.deepcopy(plain)
    assert fast_depthwise(fast) == 11 and fast_depthwise(fast) == 0  # every depthwise conv, once
    assert sum(type(m) is DepthwiseConv2d for m in fast.modules()) == 11
    assert list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(6, 3, size, size)
    for m in (plain, fast):
        m.train()
        m(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        # fp32 sums over batch x pixels (6 x up to 32 x 32) in another order: ~sqrt(n) ulps, under 1e-5 of the largest
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(), msg=name)


def test_under_bf16_autocast_the_depthwise_conv_computes_in_fp32():
    """bf16 autocast keeps depthwise convolutions in fp32 (their bf16 CPU backward is slow): the
    output and gradients are those of the fp32 step, bit for bit, from a bf16 input too."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 5, 2, 2, groups=8)
    fast = copy.deepcopy(conv)
    fast_depthwise(fast)
    ref = copy.deepcopy(fast)
    x = torch.randn(4, 8, 8, 8)
    expected = ref(x.bfloat16().float())
    grad = torch.randn_like(expected)
    expected.backward(grad)
    xb = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(xb)
        assert conv(x).dtype == torch.bfloat16  # the plain conv computes in bf16
    assert y.dtype == torch.float32
    y.backward(grad)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=0, atol=0)
    assert xb.grad.dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_nothing_but_training_takes_the_new_path(monkeypatch, tmp_path):
    model = create_backbone("mobilenetv3_small_050", 32, 16)
    fast_depthwise(model)
    monkeypatch.setattr(depthwise._DepthwiseConv2d, "apply", lambda *a: pytest.fail("not a training step"))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        model(x)
    torch.onnx.export(model, (x,), tmp_path / "m.onnx", dynamo=False)
    import onnx

    ops = {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}
    assert "Conv" in ops and not any("Python" in op for op in ops)


@pytest.mark.slow
@INDUCTOR_ON_AVX2
def test_a_compiled_backbone_with_fast_depthwise_has_eagers_gradients():
    """run.compile compiles the backbone with edgessl's depthwise convolutions in it: one training
    step's features and every gradient that is not rounding noise (above 1e-3 of the largest;
    the BatchNorm biases before a residual sum have a true gradient of 0) match eager's."""
    torch.manual_seed(0)
    eager = create_backbone("mobilenetv3_small_050", 32).train()
    fast_depthwise(eager)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    x, w = torch.randn(16, 3, 32, 32), torch.randn(eager.feature_dim)
    grads, feats = [], []
    for net in (eager, compiled):
        f = net(x)
        (f @ w).square().mean().backward()
        feats.append(f.detach())
        grads.append({n: p.grad for n, p in net.named_parameters()})
    # inductor fuses and reorders fp32 sums through ~50 layers: ~1e-6 relative per layer, 1e-4 with room
    torch.testing.assert_close(feats[1], feats[0], rtol=1e-4, atol=1e-4)
    top = max(g.norm() for g in grads[0].values())
    for name, g in grads[0].items():
        if g.norm() > 1e-3 * top:
            # backward doubles the depth of the chain above; tensors under 1e-3 of the largest norm are noise-dominated
            assert (grads[1][name] - g).norm() <= 1e-3 * g.norm(), name
