"""Supervised training of the same backbone: the throughput reference and the upper line."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgessl.config import MethodConfig
from edgessl.device import full_precision


class Supervised(nn.Module):
    num_views = 1
    needs_labels = True
    loss_parts = ()

    def __init__(self, backbone: nn.Module, num_samples: int, cfg: MethodConfig, num_classes: int = 0):
        super().__init__()
        if num_classes < 1:
            raise ValueError("supervised training needs labelled data")
        self.cfg, self.backbone = cfg, backbone
        self.fc = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, images: torch.Tensor, indices: torch.Tensor, labels=None) -> dict:
        features = self.backbone(images)
        with full_precision(features):  # the classifier and the loss in fp32 under a bf16 / fp16 step
            loss = F.cross_entropy(self.fc(features.float()), labels)
        return {"loss": loss, "parts": {}}

    @torch.no_grad()
    def update(self, out: dict, progress: float) -> None:
        """No state besides the weights."""
