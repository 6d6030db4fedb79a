"""BYOL's regression loss (Grill et al. 2020): 2 - 2 cos(prediction, stopgrad(target))."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||p/|p| - t/|t|||^2 = 2 - 2 cos(p, t); the target gets no gradient.

    prediction, target: (B, d).
    """
    p = F.normalize(prediction.float(), dim=1)
    t = F.normalize(target.float(), dim=1).detach()
    return (2 - 2 * (p * t).sum(1)).mean()
