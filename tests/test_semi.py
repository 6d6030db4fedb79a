"""Label propagation against a naive dense computation, and on cases whose answer is known; the
held-out duel that tells whether the unlabelled images carry what the labelled ones do not."""
import math

import numpy as np
import pytest
import torch

from edgessl.semi import held_out_duel, knn_graph, propagate, sign_test

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
    given = propagate(feats, labels, labelled, 3, alpha=0.9, iters=400, graph=knn_graph(feats, k=5, gamma=3.0))
    assert torch.equal(given[0], pseudo) and torch.equal(given[1], weight)  # a graph built once, passed in
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


def test_sign_test_exact_values():
    assert sign_test(6, 0) == 1 / 64 and sign_test(3, 1) == 5 / 16 and sign_test(10, 10) == pytest.approx(
        sum(math.comb(20, i) for i in range(10, 21)) / 2 ** 20)
    assert sign_test(0, 0) == 1.0 and sign_test(0, 3) == 1.0


def c_and_blob():
    """Class 0 a dense C-shaped arc, class 1 a blob in its open mouth: an arc's tips lie nearer the
    blob than the arc's mean, but the arc's unlabelled images lead back to their class. Lifted off
    the origin so that cosine similarity follows distance in the plane."""
    t = torch.linspace(math.radians(40), math.radians(320), 200)
    blob = torch.tensor([1.5, 0.0]) + 0.05 * torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    plane = torch.cat([torch.stack([t.cos(), t.sin()], 1), blob])
    labels = torch.tensor([0] * 200 + [1] * 20)
    labelled = torch.zeros(220, dtype=torch.bool)
    labelled[[0, 2, 50, 100, 150, 197, 199, 200, 205, 210, 215]] = True  # the arc's four tips among them
    return torch.cat([plane, torch.full((220, 1), 3.0)], 1), labels, labelled


def test_the_duel_credits_propagation_where_the_unlabelled_images_lead():
    feats, labels, labelled = c_and_blob()
    duels = [held_out_duel(feats, labels, labelled, 2, seed=s) for s in range(5)]
    assert duels == [(1, 0), (0, 0), (2, 0), (2, 0), (2, 0)]  # a tip held out beside its neighbour tip: both lost
    poisoned = labels.clone()
    poisoned[~labelled] = 1 - poisoned[~labelled]  # the unlabelled images' labels are never read
    assert held_out_duel(feats, poisoned, labelled, 2, seed=2) == (2, 0)
    # the labelled images alone: no arc to follow, propagation misses the tips the class means miss, and more
    only = held_out_duel(feats[labelled], labels[labelled], torch.ones(11, dtype=torch.bool), 2, seed=2)
    assert only[0] == 0 and only[1] > 0


def test_one_label_a_class_holds_nothing_out():
    feats, labels, _ = c_and_blob()
    labelled = torch.zeros(220, dtype=torch.bool)
    labelled[[100, 210]] = True
    assert held_out_duel(feats, labels, labelled, 2) == (0, 0)
