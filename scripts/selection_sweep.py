"""graph's kernel at each budget: alpha and the kNN graph's k, on a run's tuning split.

A fixed fifth of the run's training images is held out (as scripts/selection_tune.py did); graph picks
N = m x classes of the rest under the diffusion kernel (I - alpha S)^-1 of a k-neighbour graph, scored on
that fifth two ways: the picks' class means (frozen features), and label propagation from the picks over
the graph of all the run's images (what fine-tuning does from 5 labels a class). Prints one line a cell.

    .venv/bin/python scripts/selection_sweep.py RUN 1,2,5,10
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from edgessl.selection import facility_location, pick, pool
from edgessl.semi import knn_graph, propagate


def kernel(x: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    a = knn_graph(x, k=k).to_dense().mul_(-alpha)
    a.diagonal().add_(1.0)
    return torch.cholesky_inverse(torch.linalg.cholesky(a))


def main() -> None:
    run, budgets = sys.argv[1], [int(v) for v in sys.argv[2].split(",")]
    p = pool(run)
    y, classes = torch.as_tensor(p.data.labels).long(), len(p.data.classes)
    held = torch.randperm(len(y), generator=torch.Generator().manual_seed(100))[: len(y) // 5]
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[held] = False
    rows = rest.nonzero().flatten()
    x, graph = p.features[rows], knn_graph(p.features)
    arms = {f"alpha {a}, k {k}": (a, k) for a, k in [(0.8, 20), (0.5, 20), (0.65, 20), (0.9, 20), (0.8, 10), (0.8, 40)]}
    for m in budgets:
        n = m * classes
        for name, (a, k) in list(arms.items()) + [(f"random {s}", (None, s)) for s in range(3)]:
            if name.startswith("random"):
                chosen = pick(x, n, "random", seed=k)
            else:
                z = kernel(x, a, k)
                chosen = facility_location(lambda r: z[r], len(x), n, [])
            picked = rows[torch.tensor(chosen)]
            means = F.normalize(torch.zeros(classes, x.shape[1]).index_add_(0, y[picked], p.features[picked]))
            absent = torch.bincount(y[picked], minlength=classes) == 0
            cm = (p.features[held] @ means.T).masked_fill(absent, -2.0).argmax(1) == y[held]
            known = torch.zeros(len(y), dtype=torch.bool)
            known[picked] = True
            lp = propagate(p.features, y, known, classes, graph=graph)[0][held] == y[held]
            print(f"{run} {m:>2} a class, {name:16} class means {100 * cm.double().mean():6.2f}  "
                  f"propagation {100 * lp.double().mean():6.2f}", flush=True)


if __name__ == "__main__":
    main()
