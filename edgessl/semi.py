"""Few labels, many unlabelled images: pseudo-labels by label propagation over the kNN graph of
the encoder's features (Iscen, Tolias, Avrithis and Chum, "Label Propagation for Deep
Semi-supervised Learning", CVPR 2019; Zhou et al. 2004 for the diffusion).

Every image is a node; each links to its k most cosine-similar images with weight s^gamma;
the labelled images' one-hot rows (each class weighted by 1 / its count, so a class with more
labels does not flood the graph) diffuse over the symmetrically normalised graph,
Z = (I - alpha S)^-1 Y, solved by the fixed-point iteration Z <- alpha S Z + Y. An unlabelled
image takes the class of its largest score; its weight is its certainty, 1 - H(p) / log C of
its normalised scores, so a node between two classes counts little. A labelled image keeps its
label with weight 1. Only the labelled images' labels enter: the others' are never read.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

K = 20  # neighbours per image (Iscen et al.: 50 on CIFAR-10's 50k images; fewer for a few thousand)
ALPHA = 0.99  # diffusion (Iscen et al., Zhou et al.)
GAMMA = 3.0  # similarity exponent (Iscen et al.)
ITERS = 30  # fixed-point iterations (alpha S has spectral radius < 1: the error falls as alpha^t)


@torch.no_grad()
def knn_graph(features: torch.Tensor, k: int = K, gamma: float = GAMMA, chunk: int = 1024) -> torch.Tensor:
    """The symmetric, normalised kNN affinity S = D^-1/2 (A + A^T) D^-1/2 as a sparse (N, N) tensor:
    A[i, j] = max(cos(f_i, f_j), 0)^gamma for the k nearest j != i of each i."""
    x = F.normalize(features.float(), dim=1)  # (N, D)
    n = x.shape[0]
    k = min(k, n - 1)
    rows, cols, vals = [], [], []
    for start in range(0, n, chunk):
        sim = x[start:start + chunk] @ x.T  # (c, N)
        sim[torch.arange(sim.shape[0]), torch.arange(start, start + sim.shape[0])] = -2.0  # not itself
        v, j = sim.topk(k, dim=1)
        rows.append(torch.arange(start, start + sim.shape[0]).repeat_interleave(k))
        cols.append(j.flatten())
        vals.append(v.clamp(min=0).pow(gamma).flatten())
    r, c, v = torch.cat(rows), torch.cat(cols), torch.cat(vals)
    w = torch.sparse_coo_tensor(torch.stack([torch.cat([r, c]), torch.cat([c, r])]), torch.cat([v, v]),
                                (n, n), check_invariants=True).coalesce()  # A + A^T (a pair in both lists sums)
    d = torch.sparse.sum(w, 1).to_dense().clamp(min=1e-12).rsqrt()  # (N,)
    i = w.indices()
    return torch.sparse_coo_tensor(i, w.values() * d[i[0]] * d[i[1]], (n, n), check_invariants=True).coalesce()


@torch.no_grad()
def propagate(features: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor, num_classes: int,
              k: int = K, alpha: float = ALPHA, gamma: float = GAMMA, iters: int = ITERS,
              graph: Optional[torch.Tensor] = None) -> tuple:
    """(pseudo-labels (N,) int64, weights (N,) float, scores (N, C) rows summing to 1 or 0) for every
    image from the labels of the `labelled` ones (bool (N,)); `labels` is read only where `labelled`
    is true. An image the diffusion never reached (no labelled image in its component) has zero
    scores and weight 0. `graph`: knn_graph(features, k, gamma) when the caller has it already."""
    n = features.shape[0]
    s = knn_graph(features, k, gamma) if graph is None else graph
    y = torch.zeros(n, num_classes)
    known = labels[labelled]
    counts = torch.bincount(known, minlength=num_classes).clamp(min=1).float()
    y[labelled.nonzero().flatten(), known] = 1.0 / counts[known]  # each class's labels sum to 1
    z = y.clone()
    for _ in range(iters):
        z = alpha * torch.sparse.mm(s, z) + y
    p = z.clamp(min=0)
    p = p / p.sum(1, keepdim=True).clamp(min=1e-12)
    entropy = -(p * p.clamp(min=1e-12).log()).sum(1)
    weight = 1.0 - entropy / math.log(num_classes) if num_classes > 1 else torch.ones(n)
    weight[p.sum(1) == 0] = 0.0
    pseudo = p.argmax(1)
    pseudo[labelled], weight[labelled] = known, 1.0
    p[labelled] = F.one_hot(known, num_classes).float()
    return pseudo, weight.clamp(0, 1), p


@torch.no_grad()
def held_out_duel(features: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor, num_classes: int,
                  folds: int = 5, seed: int = 0) -> tuple[int, int]:
    """Do the unlabelled images carry what the labelled ones do not? The labelled images (bool
    `labelled` (N,)) are held out a fold at a time; each is classified by label propagation from the
    other folds' labels over all N images, and by the nearest class mean of the other folds'
    features (what the labelled images alone know). (wins, losses): held-out images propagation
    got right and the class means wrong, and the reverse. An image whose class has no label in the
    other folds is not counted; with one label a class there is nothing to hold out."""
    x = F.normalize(features.float(), dim=1)
    idx = labelled.nonzero().flatten()
    idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))]
    fold = torch.arange(len(idx)) % folds
    graph = knn_graph(x)  # the same for every fold: only the labels held out change
    wins = losses = 0
    for f in range(min(folds, len(idx))):
        held, keep = idx[fold == f], idx[fold != f]
        present = torch.isin(torch.arange(num_classes), labels[keep])
        held = held[present[labels[held]]]
        if len(held) == 0:
            continue
        mask = torch.zeros(len(x), dtype=torch.bool)
        mask[keep] = True
        propagated = propagate(x, labels, mask, num_classes, graph=graph)[0][held] == labels[held]
        means = F.normalize(torch.zeros(num_classes, x.shape[1]).index_add_(0, labels[keep], x[keep]), dim=1)
        nearest = (x[held] @ means.T).masked_fill(~present, -math.inf).argmax(1) == labels[held]
        wins += int((propagated & ~nearest).sum())
        losses += int((~propagated & nearest).sum())
    return wins, losses


def sign_test(wins: int, losses: int) -> float:
    """One-sided exact sign test: the chance of at least `wins` of `wins + losses` fair coin flips."""
    n = wins + losses
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / 2 ** n
