"""Does a second round of picks that uses the first round's classifier pay, with graph (the default)?

On the tuning split of scripts/selection_tune.py (a fixed fifth of the run's training images held
out), for N = m x classes: `one` is graph's N picks; `twice` is graph's N/2, then graph's N - N/2
more with the first counted as labelled (what `select --exclude` does); `margin` and `margin-prop`
take the second half as the least certain (smallest top-2 margin) of 3x as many of graph's next
picks, under the first round's class means or under label propagation (edgessl.semi) from the
first round. Each is scored on the held-out fifth by the picks' class means and by propagation
from the picks over all the run's training images. Seconds per run; writes JSON.

    .venv/bin/python scripts/selection_rounds.py RUN --out runs/rounds_RUN.json
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchlib import save_results
from edgessl.selection import pick, pool
from edgessl.semi import knn_graph, propagate

RULES = ("one", "twice", "margin", "margin-prop")


def class_means(x: torch.Tensor, y: torch.Tensor, picked: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, D) normalised means of the picked rows (a class without picks: a zero row, never chosen)."""
    return F.normalize(torch.zeros(classes, x.shape[1]).index_add_(0, y[picked], x[picked]), dim=1)


def scores(x, y, picked, classes, graph, by):
    """(N, classes) scores of every row from the picked rows' labels: class means or propagation."""
    if by == "means":
        means = class_means(x, y, picked, classes)
        absent = torch.bincount(y[picked], minlength=classes) == 0
        return (x @ means.T).masked_fill(absent, -2.0)
    mask = torch.zeros(len(x), dtype=torch.bool)
    mask[picked] = True
    return propagate(x, y, mask, classes, graph=graph)[2]


def rounds(x, y, rows, budget, rule, classes, graph) -> torch.Tensor:
    """The picks (indices into all rows) of `rule` among `rows`."""
    if rule == "one":
        return rows[pick(x[rows], budget, "graph")]
    first = pick(x[rows], budget // 2, "graph")
    rest = budget - len(first)
    if rule == "twice":
        return rows[first + pick(x[rows], rest, "graph", labelled=first)]
    cand = torch.tensor(pick(x[rows], min(3 * rest, len(rows) - len(first)), "graph", labelled=first))
    s = scores(x, y, rows[first], classes, graph, "means" if rule == "margin" else "prop")[rows[cand]]
    top2 = s.topk(2, dim=1).values
    return rows[first + cand[(top2[:, 0] - top2[:, 1]).argsort()[:rest]].tolist()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--per-class", default="2,5,10")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    p = pool(a.run)
    x, y = p.features, torch.as_tensor(p.data.labels).long()
    held = torch.randperm(len(y), generator=torch.Generator().manual_seed(100))[: len(y) // 5]
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[held] = False
    rows, classes = rest.nonzero().flatten(), len(p.data.classes)
    graph = knn_graph(x)  # over all training images: propagation reaches the held-out fifth
    results = {}
    for m in [int(v) for v in a.per_class.split(",")]:
        for rule in RULES:
            picked = rounds(x, y, rows, m * classes, rule, classes, graph)
            assert len(set(picked.tolist())) == m * classes
            for by in ("means", "prop"):
                guess = scores(x, y, picked, classes, graph, by)[held].argmax(1)
                results[f"{m}/{rule}/{by}"] = 100.0 * (guess == y[held]).double().mean().item()
            print(m, rule, {k.split("/")[-1]: round(results[k], 2) for k in results if k.startswith(f"{m}/{rule}/")},
                  flush=True)
    save_results(Path(a.out), results)


if __name__ == "__main__":
    main()
