"""Does the method's memory bank make better selection features than the backbone's? graph picks on
the tuning split of scripts/selection_tune.py (a fixed fifth of the run's training images held out)
from the backbone's features (what `select` uses), from the bank's rows (the normalised running
mean of each training image's 128-d embedding) and from both concatenated; each set of picks is
scored by its class means on the backbone's features, tested on the held-out fifth. Seconds a run.

    .venv/bin/python scripts/selection_bank.py RUN
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from edgessl.selection import pick, pool


def main(run: str) -> None:
    p = pool(run)
    bank = torch.load(f"{run}/checkpoint.pt", map_location="cpu", weights_only=True)["model"]["bank"]
    bank = F.normalize(bank.float(), dim=1)
    assert len(bank) == len(p.features), "the bank holds one row per training image"
    x, y, classes = p.features, torch.as_tensor(p.data.labels).long(), len(p.data.classes)
    held = torch.randperm(len(y), generator=torch.Generator().manual_seed(100))[: len(y) // 5]
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[held] = False
    rows = rest.nonzero().flatten()

    def top1(picked: torch.Tensor) -> float:
        means = F.normalize(torch.zeros(classes, x.shape[1]).index_add_(0, y[picked], x[picked]), dim=1)
        absent = torch.bincount(y[picked], minlength=classes) == 0
        guess = (x[held] @ means.T).masked_fill(absent, -2.0).argmax(1)
        return 100.0 * float((guess == y[held]).double().mean())

    both = F.normalize(torch.cat([x, bank], 1), dim=1)
    for m in (1, 2, 5, 10):
        scores = {name: round(top1(rows[pick(f[rows], m * classes, "graph")]), 2)
                  for name, f in (("backbone", x), ("bank", bank), ("both", both))}
        print(run, m, scores, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
