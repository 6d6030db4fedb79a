"""timm backbones with pooled features and small-input stems.

`create_backbone(name, image_size)` returns a timm model built with
`pretrained=False, num_classes=0` (so `model(x)` is the pooled feature vector),
with its early downsampling reduced for small inputs, and `feature_dim` set from a
dummy forward: MobileNetV3's pooled width is `head_hidden_size` (1024 for
small_100), not `num_features` (576), so neither attribute is trusted.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from edgessl.errors import EdgesslError

ALIASES = {
    "mobilenetv3": "mobilenetv3_small_100",
    "mobilenetv3-small": "mobilenetv3_small_100",
    "mobilenetv3-large": "mobilenetv3_large_100",
    "mobilenetv4": "mobilenetv4_conv_small",  # ReLU only: the int8-friendly edge choice
    "mobilenetv3-relu": "mobilenetv3_small_100",  # with ALIAS_ARGS: ReLU for hard-swish, for int8
    "resnet18": "resnet18",
}
# timm constructor arguments an alias implies (stored in checkpoints and exports as model_args)
ALIAS_ARGS = {"mobilenetv3-relu": {"act_layer": "relu"}}


def resolve_name(name: str) -> str:
    """Alias -> timm name; an unknown name is an error that suggests close timm names."""
    import timm

    full = ALIASES.get(name, name)
    if timm.is_model(full):
        return full
    close = difflib.get_close_matches(full, timm.list_models() + list(ALIASES), n=4, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models())"
    raise EdgesslError(f"unknown backbone {name!r}{hint}")


def auto_downsample(timm_name: str, image_size: int) -> int:
    """Default output stride for an input size.

    Inputs of 64 px or less: ResNets take the CIFAR stem (output stride 8: 3x3
    stride-1 conv1, no max-pool), the other families drop their stem stride (16):
    MobileNetV3-small ran at ~330 images/s at 16 and ~133 at 8.
    Larger inputs keep the stock stem (32).
    """
    if image_size > 64:
        return 32
    return 8 if timm_name.startswith(("resnet", "resnext", "wide_resnet", "seresnet")) else 16


def _strided_ops(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Stride-2 convs and pools of the feature extractor, in registration (= forward) order."""
    ops = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            stride = m.stride if isinstance(m.stride, tuple) else (m.stride, m.stride)
            if stride[0] == 2:
                ops.append((name, m))
    return ops


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def reduce_downsampling(model: nn.Module, factor: int) -> list[str]:
    """Remove the first log2(factor) stride-2 steps of `model`; return what was changed.

    A stride-2 conv becomes stride 1 (same padding: timm pads k//2 for odd k either
    way); a stride-2 pool becomes Identity. ResNet's 7x7 conv1 is replaced by the
    CIFAR 3x3 conv (Krizhevsky et al.'s small-input ResNet convention).
    """
    steps = {1: 0, 2: 1, 4: 2}[factor]
    changed = []
    for name, m in _strided_ops(model)[:steps]:
        if isinstance(m, nn.Conv2d):
            if m.kernel_size == (7, 7) and name == "conv1":
                _set_module(model, name, nn.Conv2d(m.in_channels, m.out_channels, 3, 1, 1, bias=m.bias is not None))
                changed.append(f"{name}: 7x7/2 -> 3x3/1")
            else:
                m.stride = (1, 1)
                changed.append(f"{name}: stride 2 -> 1")
        else:
            _set_module(model, name, nn.Identity())
            changed.append(f"{name}: pool -> identity")
    if len(changed) < steps:
        raise EdgesslError(f"cannot reduce the downsampling of {type(model).__name__} by {factor}x: "
                           f"found only {len(changed)} stride-2 layers")
    return changed


def create_backbone(name: str, image_size: int = 32, downsample: Union[str, int] = "auto",
                    init_weights: Optional[str] = None, model_args: Optional[dict] = None) -> nn.Module:
    """timm model with pooled features, `feature_dim`, `timm_name`, `model_args` (timm constructor
    arguments: the alias's, then the given ones) and `output_stride` set."""
    import timm

    timm_name = resolve_name(name)
    model_args = {**ALIAS_ARGS.get(name, {}), **(model_args or {})}
    ds = auto_downsample(timm_name, image_size) if downsample == "auto" else int(downsample)
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, **model_args)
    stock = _output_stride(model, image_size)
    if ds > stock or stock % ds or stock // ds > 4:
        raise EdgesslError(f"{timm_name} has output stride {stock}; downsample {ds} is not reachable")
    model.stem_changes = reduce_downsampling(model, stock // ds)
    if init_weights:  # after the stem change: a weight that no longer fits is named, never dropped
        load_weights(model, init_weights)
    model.timm_name, model.output_stride, model.model_args = timm_name, ds, model_args
    model.feature_dim = _pooled_width(model, image_size)
    return model


def _output_stride(model: nn.Module, image_size: int) -> int:
    probe = max(image_size, 64)
    fmap = _dummy(model.forward_features, probe)
    return probe // fmap.shape[-1]


def _pooled_width(model: nn.Module, image_size: int) -> int:
    return _dummy(model, image_size).shape[-1]


@torch.no_grad()
def _dummy(fn, size: int) -> torch.Tensor:
    module = getattr(fn, "__self__", fn)
    was_training = module.training
    module.eval()  # eval: no BatchNorm statistics are touched by the probe
    try:
        return fn(torch.zeros(1, 3, size, size))
    finally:
        module.train(was_training)


def load_weights(model: nn.Module, path: str) -> None:
    """Strictly load a local timm state dict (.safetensors or a weights-only .pth/.pt)."""
    p = Path(path)
    if not p.is_file():
        raise EdgesslError(f"init weights not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    except Exception as e:  # any parse failure of a foreign file is one clear line
        raise EdgesslError(f"cannot read init weights {p}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise EdgesslError(f"init weights {p} hold no state dict")
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier.", "head.fc."))}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {', '.join(missing[:5])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:5])}" if unexpected else "",
                 f"shape mismatch {'; '.join(shapes[:5])}" if shapes else ""]
        raise EdgesslError(f"init weights {p} do not fit {model.default_cfg.get('architecture', '')}: "
                           + "; ".join(x for x in parts if x))
    model.load_state_dict(state, strict=True)


def load_backbone(folder: str | Path) -> nn.Module:
    """A backbone written by `edgessl export --format timm`: a plain timm module, stem included."""
    import json

    root = Path(folder)
    try:
        config = json.loads((root / "config.json").read_text())
        arch, size = config["architecture"], config["pretrained_cfg"]["input_size"][-1]
        stride, model_args = config["edgessl"]["output_stride"], dict(config.get("model_args") or {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgesslError(f"{root} is not an edgessl timm export ({type(e).__name__}: {e})") from None
    return create_backbone(arch, size, stride, str(root / "model.safetensors"), model_args)
