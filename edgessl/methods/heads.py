"""Projection heads shared by the methods."""
from __future__ import annotations

from torch import nn


def projection_head(in_dim: int, dims: list[int]) -> nn.Sequential:
    """Linear-BN-ReLU blocks ending in a plain Linear: dims [2048, 2048, 2048] is the released
    script's head, Linear(D, 2048)-BN-ReLU-Linear(2048, 2048)-BN-ReLU-Linear(2048, 2048)."""
    layers: list[nn.Module] = []
    for i, out in enumerate(dims):
        layers.append(nn.Linear(in_dim, out, bias=i == len(dims) - 1))
        if i < len(dims) - 1:
            layers += [nn.BatchNorm1d(out), nn.ReLU(inplace=True)]
        in_dim = out
    return nn.Sequential(*layers)
