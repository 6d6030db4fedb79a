"""One path from uint8 images to a network's outputs: eval mode (restored after), the
normalisation, the run's autocast, batches moved to the network's device, compiled code run
eagerly, fp32 out. Every caller goes through it: the kNN monitor, probe and embed, fine-tuning's
label propagation and test, the exporter's kNN against torch, the int8 student's teacher bank.
(An exported file's features go through its own runtime: edgessl_edge.backends.)"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from edgessl.augment import normalize
from edgessl.device import autocast

BATCH = 256


@torch.no_grad()
def features(net: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
             device: Optional[torch.device] = None, precision: str = "fp32", batch_size: int = BATCH) -> torch.Tensor:
    """`net` on uint8 images (N, 3, S, S) normalised by mean/std, in eval mode and `precision`'s
    autocast: (N, ...) fp32 on `device` (default: the network's)."""
    if device is None:
        device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out = []
    try:
        # a compiled backbone (run.compile) runs eager here: eval mode, no grad and other batch sizes would
        # each compile graphs of their own, for a few seconds of work
        with autocast(device, precision), torch.compiler.set_stance("force_eager"):
            for chunk in images.split(batch_size):
                out.append(net(normalize(chunk.to(device), mean, std)).float())
    finally:
        net.train(was_training)
    return torch.cat(out) if out else torch.empty(0, device=device)
