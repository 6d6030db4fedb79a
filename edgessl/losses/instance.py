"""Non-parametric instance discrimination loss (NPID, Wu et al. 2018), CutMix-aware."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def instance_loss(cosines: torch.Tensor, targets: torch.Tensor, temperature: float,
                  targets_b: Optional[torch.Tensor] = None, lam: float = 1.0) -> torch.Tensor:
    """L_ID = lam * CE(c / tau, targets) + (1 - lam) * CE(c / tau, targets_b), mean over the batch.

    cosines: (B, C) cosine scores of each image against the C scored bank rows.
    targets: (B,) column of each image's own row; targets_b: (B,) the CutMix partner's.
    """
    logits = cosines.float() / temperature  # (B, C)
    loss = F.cross_entropy(logits, targets, reduction="mean")
    if targets_b is None or lam == 1.0:
        return loss
    return lam * loss + (1.0 - lam) * F.cross_entropy(logits, targets_b, reduction="mean")
