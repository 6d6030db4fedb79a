"""Optimizers and the one optimizer step that pretraining and fine-tuning share."""
from __future__ import annotations

import math
from typing import Optional

import torch

from edgessl import distributed
from edgessl.errors import EdgesslError


def param_groups(model: torch.nn.Module, weight_decay: float,
                 lr_scales: Optional[dict[torch.nn.Module, float]] = None) -> list[dict]:
    """The one weight decay rule: on weight matrices and kernels only, not on biases and norm
    weights. `lr_scales`: a pair of groups per part of the model, each with its learning-rate scale."""
    parts = lr_scales or {model: None}
    groups = []
    for part, scale in parts.items():
        params = list(part.parameters())
        pair = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
                {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        groups += [{**g, "lr_scale": scale} for g in pair] if scale is not None else pair
    return groups


def make_optimizer(groups: list[dict], name: str, lr: float, momentum: float = 0.9, nesterov: bool = False,
                   fused: bool = True, capturable: bool = False) -> torch.optim.Optimizer:
    """The one optimizer factory (pretraining, fine-tuning, the int8 student): SGD or AdamW over
    param_groups' groups; torch's fused kernel where it has one (CPU and CUDA), the for-loop
    elsewhere. `capturable`: AdamW's step count stays on the device, so a CUDA graph can hold its
    step (SGD has none)."""
    devices = {p.device.type for g in groups for p in g["params"]}
    kernel = {"fused": True} if fused and devices <= {"cpu", "cuda"} else {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **kernel, **({"capturable": True} if capturable else {}))
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, **kernel)
    raise ValueError(f"unknown optimizer {name!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group gets `lr` times its own `lr_scale` (1 when the group sets none); a group whose
    learning rate is a tensor gets it in place (edgessl.capture's steps read it there)."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr * g.get("lr_scale", 1.0))
        else:
            g["lr"] = lr * g.get("lr_scale", 1.0)


def check_finite(loss: float, step: int, device: torch.device) -> None:
    """A NaN or inf loss (on any rank) stops the run before the weights or a memory bank take it in.
    `loss` is a Python float: the caller reads it from the device once per step, with its parts."""
    if distributed.any_rank(not math.isfinite(loss), device):
        where = " on this rank or another" if distributed.world()[1] > 1 else ""
        raise EdgesslError(f"loss is {loss} at step {step}{where}: stopped before the weights "
                           "or the bank took it in; the last checkpoint is kept")


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler) -> bool | torch.Tensor:
    """Backward and step through the GradScaler; true when fp16 overflowed and the step was skipped
    (the scale was lowered: not fatal, counted by the caller). With fp16 it is a 0-d tensor on the
    device, so the step does not wait for the device; the caller reads it with the loss."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if not scaler.is_enabled():
        optimizer.step()
        return False
    before = scaler._get_scale_async().clone()  # get_scale() would wait for the device
    scaler.step(optimizer)
    scaler.update()
    return scaler._get_scale_async() < before


def guarded_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, step: int,
                 device: torch.device, read: bool) -> bool | torch.Tensor:
    """The optimizer step every trainer takes: with `read` (where reading the loss costs nothing: the
    CPU), a NaN or inf loss stops the run before the weights take it in; else the caller reads the
    losses later, in one wait, and checks them there."""
    if read:
        check_finite(float(loss.detach()), step, device)
    return optimizer_step(loss, optimizer, scaler)
