"""kNN against a naive loop, and an exact hand-worked answer."""
import math

import torch

from edgessl.knn import knn_accuracy, knn_predict, pixels_margin


def test_knn_exact_small_example():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_accuracy(train, labels, queries, torch.tensor([0, 1]), 2, k=2) == 100.0
    scores = knn_predict(train, labels, torch.tensor([[1.0, 0.0]]), 2, k=1, t=0.1)
    assert torch.allclose(scores, torch.tensor([[math.exp(10.0), 0.0]]))


def test_knn_matches_naive_loop():
    torch.manual_seed(0)
    train, labels, queries = torch.randn(50, 8), torch.randint(0, 4, (50,)), torch.randn(7, 8)
    got = knn_predict(train, labels, queries, 4, k=5, t=0.1, chunk=3)
    tn = torch.nn.functional.normalize(train, dim=1)
    for qi, q in enumerate(torch.nn.functional.normalize(queries, dim=1)):
        sims = [(float(q @ tn[i]), int(labels[i])) for i in range(50)]
        sims.sort(reverse=True)
        votes = [0.0] * 4
        for s, c in sims[:5]:
            votes[c] += math.exp(s / 0.1)
        assert torch.allclose(got[qi], torch.tensor(votes), rtol=1e-5)


def test_pixels_margin_is_two_binomial_standard_errors():
    # 25% on 1,034 images: 200 * sqrt(0.25 * 0.75 / 1034) = 2.693 points
    assert math.isclose(pixels_margin(25.0, 1034), 2.6932, abs_tol=1e-4)
    assert pixels_margin(50.0, 100) == 10.0 and pixels_margin(0.0, 100) == 0.0
    # the small-set case it is for: 24.5 trained against 25.15 pixels is inside; 30.5 is not
    assert 24.5 - 25.15 < pixels_margin(25.15, 1034) < 30.5 - 25.15


def test_heldout_knn_uses_the_train_split_as_memory():
    from types import SimpleNamespace

    from edgessl.knn import heldout_knn

    train = SimpleNamespace(images=torch.tensor([[10.0, 0.0], [0.0, 1.0]]), labels=torch.tensor([0, 1]),
                            classes=["a", "b"])
    val = SimpleNamespace(images=torch.tensor([[3.0, 1.0], [1.0, 3.0]]), labels=torch.tensor([1, 1]))
    # (3, 1) is nearer (10, 0) by cosine; centred by the train mean (5, 0.5) it is (-2, 0.5), nearer (-5, 0.5)
    assert heldout_knn(lambda x: x, train, val, k=1) == 50.0
    assert heldout_knn(lambda x: x, train, val, k=1, center=True) == 100.0
    assert heldout_knn(lambda x: x, train, None) is None
    assert heldout_knn(lambda x: x, train, SimpleNamespace(images=val.images, labels=None)) is None
