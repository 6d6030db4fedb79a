"""Weighted kNN classification on frozen features (NPID's evaluation protocol)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, query_feats: torch.Tensor,
                num_classes: int, k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores (Q, num_classes): the k most cosine-similar train features vote exp(sim / t).

    train_feats (N, D), train_labels (N,), query_feats (Q, D); features need not be normalised.
    """
    train = F.normalize(train_feats.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for q in F.normalize(query_feats.float(), dim=1).split(chunk):
        sim, idx = (q @ train.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        scores.append(votes.scatter_add_(1, train_labels[idx], (sim / t).exp()))
    return torch.cat(scores)


def knn_accuracy(train_feats, train_labels, query_feats, query_labels, num_classes, k=200, t=0.1) -> float:
    """Top-1 accuracy in percent."""
    pred = knn_predict(train_feats, train_labels, query_feats, num_classes, k, t).argmax(1)
    return 100.0 * (pred == query_labels).float().mean().item()


def heldout_knn(features, train, val, k: int = 200, center: bool = False) -> Optional[float]:
    """kNN top-1 (%) on a held-out split, the training split as memory: `features` maps a set's uint8
    images (N, 3, S, S) to (N, D); `train` and `val` have .images, .labels and .classes. center:
    subtract the training mean (raw pixels). None when either split has no labels."""
    if val is None or train.labels is None or val.labels is None:
        return None
    ftr, fva = features(train.images).float(), features(val.images).float()
    if center:
        mu = ftr.mean(0)
        ftr, fva = ftr - mu, fva - mu
    return knn_accuracy(ftr, train.labels, fva, val.labels, len(train.classes), k)


def pixels_margin(pixels: float, n: int) -> float:
    """Two binomial standard errors (percentage points) of raw pixels' kNN top-1 (%) on n held-out
    images: a trained network less than this above the pixels has not shown it learned anything more."""
    p = pixels / 100
    return 200 * math.sqrt(p * (1 - p) / n)
