"""NT-Xent, SimCLR's normalised temperature-scaled cross entropy (Chen et al. 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ntxent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the 2B views of -log softmax of the positive among the 2B - 1 others.

    z1, z2: (B, d) projections of two views of the same B images (normalised here).
    """
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, d)
    b = z1.shape[0]
    logits = z @ z.T / temperature  # (2B, 2B)
    logits.fill_diagonal_(float("-inf"))  # a view is not its own negative
    targets = torch.cat([torch.arange(b, 2 * b, device=z.device), torch.arange(0, b, device=z.device)])
    return F.cross_entropy(logits, targets)
