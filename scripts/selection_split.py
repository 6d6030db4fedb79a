"""Why the tuning split's lead does not carry to the held-out images: graph's picks against 20 random
draws (3-22), each from the tuning split's pool (the run's training images less a fixed fifth, as in
scripts/selection_tune.py) and from all of them, scored untrained (the picks' class means on frozen
features) on the tuning fifth, on it class-balanced, on the run's held-out images, and on those
reweighted to the training images' class sizes. Seconds a run.

    .venv/bin/python scripts/selection_split.py RUN
"""
from __future__ import annotations

import statistics
import sys

import numpy as np
import torch
import torch.nn.functional as F

from edgessl import data as data_lib
from edgessl.probe import run_features
from edgessl.rebuild import read_state, run_config
from edgessl.selection import pick, pool


def main(run: str) -> None:
    p = pool(run)
    x, y = p.features, torch.as_tensor(np.asarray(p.data.labels)).long()
    test = data_lib.load_split(run_config(read_state(run)).data)[1]
    t, ty = F.normalize(run_features(run).fn(test.images).float(), dim=1), torch.as_tensor(np.asarray(test.labels)).long()
    classes = int(y.max()) + 1
    held = torch.randperm(len(y), generator=torch.Generator().manual_seed(100))[: len(y) // 5]
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[held] = False
    rows = rest.nonzero().flatten()
    size = torch.bincount(y, minlength=classes).float()
    tests = {"fifth": (x[held], y[held], None),
             "fifth, class-balanced": (x[held], y[held], 1 / torch.bincount(y[held], minlength=classes).clamp(min=1)),
             "held-out": (t, ty, None),
             "held-out at train's class sizes": (t, ty, size / torch.bincount(ty, minlength=classes).clamp(min=1))}

    def top1(picked: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, weight) -> float:
        means = F.normalize(torch.zeros(classes, x.shape[1]).index_add_(0, y[picked], x[picked]), dim=1)
        absent = torch.bincount(y[picked], minlength=classes) == 0
        right = ((feats @ means.T).masked_fill(absent, -2.0).argmax(1) == labels).double()
        w = torch.ones(len(labels), dtype=torch.double) if weight is None else weight[labels].double()
        return 100.0 * float((right * w).sum() / w.sum())

    for m in (1, 2, 5, 10):
        for name, among in (("tuning pool", rows), ("all", torch.arange(len(y)))):
            g = among[pick(x[among], m * classes, "graph")]
            draws = [among[pick(x[among], m * classes, "random", seed=s)] for s in range(3, 23)]
            lead = {k: round(top1(g, *v) - statistics.mean(top1(r, *v) for r in draws), 2) for k, v in tests.items()}
            print(run, m, name, lead, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
