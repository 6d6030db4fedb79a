"""Label propagation against a naive dense computation, and on a case whose answer is known."""
import math

import numpy as np
import pytest
import torch

from edgessl.semi import knn_graph, propagate

pytestmark = pytest.mark.numeric  # run again with the CPU capped to AVX2 (make test-avx2)


def naive(features, labels, labelled, classes, k, alpha, gamma):
    """Loops and a dense solve of (I - alpha S) Z = Y."""
    x = features.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    a = np.zeros((n, n))
    for i in range(n):
        sims = [(x[i] @ x[j], j) for j in range(n) if j != i]
        for s, j in sorted(sims, reverse=True)[:k]:
            a[i, j] = max(s, 0.0) ** gamma
    w = a + a.T
    d = 1 / np.sqrt(w.sum(1))
    s = w * d[:, None] * d[None, :]
    y = np.zeros((n, classes))
    counts = np.bincount(labels[labelled].numpy(), minlength=classes)
    for i in range(n):
        if labelled[i]:
            y[i, labels[i]] = 1 / counts[labels[i]]
    z = np.linalg.solve(np.eye(n) - alpha * s, y)
    p = np.clip(z, 0, None)
    p = p / p.sum(1, keepdims=True)
    h = -(p * np.log(np.clip(p, 1e-12, None))).sum(1)
    return s, p.argmax(1), 1 - h / math.log(classes)


def test_propagation_matches_a_dense_solve():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g) * 3
    labels = torch.arange(30) % 3
    feats = centres[labels] + torch.randn(30, 8, generator=g)
    labelled = torch.zeros(30, dtype=torch.bool)
    labelled[[0, 1, 2, 5]] = True
    s_ref, pseudo_ref, weight_ref = naive(feats, labels, labelled, 3, k=5, alpha=0.9, gamma=3.0)
    s = knn_graph(feats, k=5, gamma=3.0).to_dense().double().numpy()
    np.testing.assert_allclose(s, s_ref, atol=1e-6)
    pseudo, weight, _ = propagate(feats, labels, labelled, 3, k=5, alpha=0.9, gamma=3.0, iters=400)
    expect = torch.from_numpy(pseudo_ref)
    expect[labelled] = labels[labelled]
    assert torch.equal(pseudo, expect)
    w = torch.from_numpy(weight_ref).float()
    w[labelled] = 1.0
    assert torch.allclose(weight, w, atol=1e-4)


def test_two_clusters_take_their_one_label_each():
    """Two tight, far-apart clusters with one labelled image each: every image gets its cluster's label,
    with certainty near 1; the labels of the unlabelled images are never read."""
    feats = torch.cat([torch.tensor([1.0, 0.0]) + 0.01 * torch.randn(10, 2), torch.tensor([0.0, 1.0]) +
                       0.01 * torch.randn(10, 2)])
    truth = torch.tensor([0] * 10 + [1] * 10)
    labelled = torch.zeros(20, dtype=torch.bool)
    labelled[[3, 14]] = True
    poisoned = truth.clone()
    poisoned[~labelled] = 1 - poisoned[~labelled]  # wrong on every unlabelled image
    for given in (truth, poisoned):
        pseudo, weight, _ = propagate(feats, given, labelled, 2, k=4)
        assert torch.equal(pseudo, truth) and bool((weight > 0.9).all())


def test_an_unreached_component_gets_no_weight():
    feats = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    labelled = torch.tensor([True, False, False, False])
    _, weight, _ = propagate(feats, torch.tensor([0, 0, 0, 0]), labelled, 2, k=1, gamma=3.0)
    assert weight[1] > 0.5 and weight[2] == 0 and weight[3] == 0  # k=1: {0, 1} and {2, 3} are apart
