"""SimCLR (Chen et al. 2020): two views per image, NT-Xent, a 2-layer projection head.

The two-view baseline memdistill is measured against: same backbones, augmentation,
precision and trainer; twice the forward and backward work per image.
"""
from __future__ import annotations

import torch
from torch import nn

from edgessl.config import MethodConfig
from edgessl.device import full_precision
from edgessl.losses import ntxent_loss
from edgessl.methods.heads import projection_head


class SimCLR(nn.Module):
    num_views = 2
    loss_parts = ()

    def __init__(self, backbone: nn.Module, num_samples: int, cfg: MethodConfig):
        super().__init__()
        self.cfg, self.backbone = cfg, backbone
        self.head = projection_head(backbone.feature_dim, cfg.head_dims)

    def forward(self, images: torch.Tensor, indices: torch.Tensor, labels=None) -> dict:
        """images: (2B, 3, S, S), the two views of the batch stacked (view 1 rows, then view 2)."""
        features = self.backbone(images)
        with full_precision(features):  # the head and the loss in fp32 under a bf16 / fp16 step
            z1, z2 = self.head(features.float()).chunk(2)  # (B, d) each
            loss = ntxent_loss(z1, z2, self.cfg.temperature)
        return {"loss": loss, "parts": {}}

    @torch.no_grad()
    def update(self, out: dict, progress: float) -> None:
        """SimCLR keeps no state besides its weights."""
