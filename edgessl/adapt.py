"""Adapt a trained backbone to what onnxruntime runs in int8: swap the activations it has no
integer kernel for, then recover the features by a short distillation from the original.

onnxruntime's CPU provider fuses Conv with Relu or Clip into one int8 QLinearConv, but runs
HardSwish in float between Dequantize and Quantize nodes: that is what keeps int8 MobileNetV3
no faster than fp32 (docs/export.md). Hard-swish becomes ReLU here (the SE gates' hard-sigmoid
stays: the export folds it into the gate's conv as clip(0, 1), which quantises), and the student, initialised
from the teacher, learns to give the teacher's pooled features (cosine) on the run's own
images, augmented as in pretraining, for a few minutes.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from edgessl.augment import BatchAugment
from edgessl.config import Config
from edgessl.depthwise import fast_depthwise, plain_depthwise


def swap_hardswish(module: nn.Module, gate: bool = False) -> int:
    """Replace every nn.Hardswish by nn.ReLU in place (and with `gate`, every nn.Hardsigmoid by
    nn.Sigmoid, which onnxruntime runs as one int8 lookup table); return how many."""
    return swap_modules(module, {nn.Hardswish: nn.ReLU, **({nn.Hardsigmoid: nn.Sigmoid} if gate else {})})


def swap_modules(module: nn.Module, swaps: dict) -> int:
    """Replace every submodule of a type in `swaps` by `swaps[type]()`, in place; return how many."""
    count = 0
    for name, child in list(module.named_modules()):
        if type(child) in swaps:
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, attr, swaps[type(child)]())
            count += 1
    return count


def needs_adapting(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Hardswish) for m in module.modules())


def distill(teacher: nn.Module, images: torch.Tensor, cfg: Config, seconds: float = 120.0,
            batch_size: int = 64, lr: float = 1e-3, seed: int = 0, progress: Optional[bool] = None,
            gate: bool = False) -> tuple:
    """(student, stats): the teacher with hard-swish swapped for ReLU, trained for `seconds` so
    its pooled features match the teacher's (1 - cosine) on augmented `images` (uint8 N x 3 x S x S)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    teacher = teacher.eval()
    student = copy.deepcopy(teacher)
    swapped = swap_hardswish(student, gate)
    fast_depthwise(student)  # the faster CPU backward (edgessl.depthwise): more steps in the budget
    student.train()
    augment = BatchAugment(cfg.augment, images.shape[-1], cfg.data.mean, cfg.data.std)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    show = sys.stderr.isatty() if progress is None else progress
    start, step, losses = time.perf_counter(), 0, []
    with tqdm(total=round(seconds), disable=not show, unit="s", desc="int8: distilling ReLU student",
              leave=False) as bar:
        while (elapsed := time.perf_counter() - start) < seconds:
            for g in opt.param_groups:  # cosine over the time budget
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / seconds)))
            idx = torch.randint(0, len(images), (batch_size,))
            x = augment(images[idx])
            with torch.no_grad():
                target = teacher(x)
            loss = (1 - F.cosine_similarity(student(x), target, dim=1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            bar.update(round(time.perf_counter() - start) - bar.n)
    plain_depthwise(student)
    return student.eval(), {"swapped": swapped, "steps": step, "seconds": round(time.perf_counter() - start, 1),
                            "loss_first": losses[0] if losses else None,
                            "loss_last": sum(losses[-20:]) / max(1, len(losses[-20:]))}
