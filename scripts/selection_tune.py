"""Which selection rule is the default: each `edgessl select` rule on a run's tuning split.

A fixed fifth of the run's training images is held out; each rule picks N = m x classes of the
rest, and a nearest-class-mean classifier on the picks' frozen features (cosine to each class's
normalised mean; a class without picks is never chosen) is tested on that fifth. Nothing trains,
so every rule, budget and seed takes seconds. Writes JSON, prints a Markdown table.

    .venv/bin/python scripts/selection_tune.py RUN --rules herding,typical,kmeans,coverage,random --out runs/t.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchlib import markdown
from edgessl.selection import pick, pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--per-class", default="1,2,5,10")
    ap.add_argument("--rules", default="herding,typical,kmeans,coverage,random")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the rules that have one (herding: the first only)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    p = pool(a.run)
    y = torch.as_tensor(p.data.labels).long()
    held = torch.randperm(len(y), generator=torch.Generator().manual_seed(100))[: len(y) // 5]
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[held] = False
    rows = rest.nonzero().flatten()
    x, classes, results, table = p.features[rows], len(p.data.classes), {}, []
    for m in [int(v) for v in a.per_class.split(",")]:
        for rule in a.rules.split(","):
            seeds = [int(v) for v in a.seeds.split(",")][: 1 if rule == "herding" else None]
            for seed in seeds:
                picked = rows[pick(x, m * classes, rule, seed=seed)]
                means = F.normalize(torch.zeros(classes, x.shape[1]).index_add_(0, y[picked], p.features[picked]))
                absent = torch.bincount(y[picked], minlength=classes) == 0
                guess = (p.features[held] @ means.T).masked_fill(absent, -2.0).argmax(1)
                results[f"{m}/{rule}/{seed}"] = {"top1": 100.0 * (guess == y[held]).double().mean().item(),
                                                 "empty_classes": int(absent.sum())}
            cells = [results[f"{m}/{rule}/{s}"] for s in seeds]
            top1 = [c["top1"] for c in cells]
            table.append([m, rule, f"{sum(top1) / len(top1):.2f}", " / ".join(f"{t:.2f}" for t in top1),
                          " ".join(str(c["empty_classes"]) for c in cells)])
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(markdown(["labels a class", "rule", "top-1, mean", "seeds", "classes unlabelled"], table, "rlrll"))


if __name__ == "__main__":
    main()
