"""BYOL (Grill et al. 2020): two views, an online network with a predictor, and an EMA target
network whose momentum follows the usual cosine schedule from byol_momentum to 1."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from edgessl.config import MethodConfig
from edgessl.device import full_precision
from edgessl.losses import byol_loss
from edgessl.methods.heads import projection_head


class BYOL(nn.Module):
    num_views = 2
    loss_parts = ()

    def __init__(self, backbone: nn.Module, num_samples: int, cfg: MethodConfig):
        super().__init__()
        self.cfg, self.backbone = cfg, backbone
        self.head = projection_head(backbone.feature_dim, cfg.head_dims)
        self.predictor = projection_head(cfg.head_dims[-1], cfg.predictor_dims)
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_head = copy.deepcopy(self.head).requires_grad_(False)

    def forward(self, images: torch.Tensor, indices: torch.Tensor, labels=None) -> dict:
        """images: (2B, 3, S, S), view 1 rows then view 2 rows."""
        features = self.backbone(images)
        with torch.no_grad():
            target_features = self.target_backbone(images)
        with full_precision(features):  # heads and loss in fp32 under a bf16 / fp16 step
            p1, p2 = self.predictor(self.head(features.float())).chunk(2)  # (B, d) each
            with torch.no_grad():
                t1, t2 = self.target_head(target_features.float()).chunk(2)
            loss = 0.5 * (byol_loss(p1, t2) + byol_loss(p2, t1))
        return {"loss": loss, "parts": {}}

    def momentum(self, progress):
        """tau = 1 - (1 - tau_base) (cos(pi progress) + 1) / 2 (BYOL, section 3.2); a tensor for a
        float64 tensor `progress` (a CUDA graph's step: its progress changes in place)."""
        cos = torch.cos(math.pi * progress) if isinstance(progress, torch.Tensor) else math.cos(math.pi * progress)
        return 1 - (1 - self.cfg.byol_momentum) * (cos + 1) / 2

    @torch.no_grad()
    def update(self, out: dict, progress) -> None:
        """EMA of the online weights into the target; BatchNorm statistics are copied."""
        tau = self.momentum(progress)
        for online, target in ((self.backbone, self.target_backbone), (self.head, self.target_head)):
            for po, pt in zip(online.parameters(), target.parameters()):
                pt.mul_(tau).add_(po.detach() * (1 - tau))  # (alpha= would read a tensor tau on the host)
            for bo, bt in zip(online.buffers(), target.buffers()):
                bt.copy_(bo)
