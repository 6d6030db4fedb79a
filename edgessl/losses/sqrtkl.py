"""SqrtKL self-distillation (Cao and Wu, arXiv 2404.19289).

u = normalise_L1(sqrt(p)) is held as a stop-gradient target and the loss is
KL(p || u) = sum_k p_k (log p_k - log u_k). Since sqrt(softmax(s)) normalised is
softmax(s / 2), log u = log_softmax(s / 2): no sqrt of tiny probabilities. With the
stop-gradient its gradient is half that of -H(p) (tests/test_losses.py checks it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sqrtkl_loss(cosines: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over the batch of KL(p || stopgrad(u)), p = softmax(cosines / temperature).

    cosines: (B, C). The released script uses temperature 1 (raw cosines).
    """
    s = cosines.float() / temperature  # (B, C)
    log_p = F.log_softmax(s, dim=1)
    log_u = F.log_softmax(s / 2, dim=1).detach()
    return (log_p.exp() * (log_p - log_u)).sum(1).mean()
