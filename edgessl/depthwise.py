"""A faster CPU backward for depthwise convolutions, the bulk of a MobileNet training step.

PyTorch's CPU kernel for the weight gradient of a depthwise convolution (groups == channels)
is slow for 5x5 kernels on the small feature maps of small inputs: many times the forward
pass for a few million multiply-adds, and a large share of a MobileNetV3-small step at 32 px
(docs/benchmarks.md, "The step").
The same gradient is two other calls that are fast there:

- maps of at most SMALL_MAP pixels: a grouped convolution of the input with the output
  gradient (per channel, the batch becomes the reduction axis);
- larger maps: PyTorch's own weight-gradient kernel on channels-last copies.

Under bf16 autocast on the CPU the depthwise convolutions compute in fp32 (the rest of the
network in bf16): PyTorch's bf16 depthwise backward made a bf16 MobileNetV3 step slower than
fp32, and with it in fp32 the pointwise convolutions get bf16's speed (AMX) alone.

The forward pass and the input gradient stay PyTorch's own. The numbers are the same to
float rounding (tests/test_depthwise.py checks both against autograd). `fast_depthwise(model)`
switches a module's depthwise convolutions to it; parameters and state-dict keys are
unchanged, and eval mode, no-grad, tracing, ONNX export and non-CPU tensors take the plain
path, so an exported graph holds ordinary Conv nodes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SMALL_MAP = 16  # output pixels (h x w) up to which the grouped convolution computes the weight gradient


def weight_grad(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, stride, padding,
                dilation) -> torch.Tensor:
    """d(loss)/d(weight) of a depthwise conv2d(x, weight (C, 1, kh, kw)) given d(loss)/d(output)."""
    b, c, h, w = x.shape
    kh, kw = weight.shape[-2:]
    if grad.shape[-2] * grad.shape[-1] <= SMALL_MAP:
        # out[c, u, v] = sum_{b, i, j} x_pad[b, c, u + i * stride, v + j * stride] * grad[b, c, i, j];
        # the weight gradient is out at u = p * dilation, v = q * dilation
        out = F.conv2d(x.transpose(0, 1).reshape(1, c * b, h, w),
                       grad.transpose(0, 1).reshape(c, b, grad.shape[-2], grad.shape[-1]),
                       padding=padding, dilation=stride, groups=c)[0]
        return out[:, :(kh - 1) * dilation[0] + 1:dilation[0], :(kw - 1) * dilation[1] + 1:dilation[1]].unsqueeze(1)
    cl = torch.channels_last
    return torch.ops.aten.convolution_backward(
        grad.contiguous(memory_format=cl), x.contiguous(memory_format=cl), weight, None, stride, padding, dilation,
        False, [0, 0], c, [False, True, False])[1].contiguous()


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation)
        return F.conv2d(x, weight, None, stride, padding, dilation, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        own_w = ctx.needs_input_grad[1] and weight.shape[-1] * weight.shape[-2] > 9  # 3x3: PyTorch's is fast
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, stride, padding, dilation, False, [0, 0], weight.shape[0],
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1] and not own_w, False])
        if own_w:
            grad_w = weight_grad(x, grad, weight, stride, padding, dilation)
        return grad_x, grad_w, None, None, None


class DepthwiseConv2d(nn.Conv2d):
    """nn.Conv2d with the faster CPU backward while training (in fp32, under autocast too); the
    plain conv otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.device.type == "cpu"
                and (x.dtype == torch.float32 or torch.is_autocast_enabled("cpu"))
                and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export()):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            y = _DepthwiseConv2d.apply(x.float(), self.weight, self.stride, self.padding, self.dilation)
            return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def is_depthwise(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.groups > 1 and m.groups == m.in_channels == m.out_channels
            and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def fast_depthwise(model: nn.Module) -> int:
    """Switch `model`'s depthwise nn.Conv2d modules to DepthwiseConv2d in place; the count switched."""
    n = 0
    for m in model.modules():
        if is_depthwise(m):
            m.__class__ = DepthwiseConv2d  # the same module, parameters and hooks: only forward differs
            n += 1
    return n


def plain_depthwise(model: nn.Module) -> int:
    """Undo fast_depthwise: back to plain nn.Conv2d in place; the count switched back."""
    n = 0
    for m in model.modules():
        if type(m) is DepthwiseConv2d:
            m.__class__ = nn.Conv2d
            n += 1
    return n
