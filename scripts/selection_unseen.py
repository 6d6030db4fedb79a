"""Which selection rule, tuned on images the encoder never saw: a run pretrained on four fifths of a
set's training images (`edgessl pretrain --val-fraction 0.2`); each rule picks N = m x classes of the
run's training images, and the picks' class means (frozen features) are tested on the run's held-out
fifth, which the pretraining did not see (scripts/selection_tune.py@aab5438 held out a fifth that it
had). graph also with the diffusion kernel's alpha at 0.5 and 0.9. Seconds a run; writes JSON.

    .venv/bin/python scripts/selection_unseen.py RUN --out runs/unseen_RUN.json
"""
from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchlib import markdown, save_results
from edgessl import data as data_lib, selection
from edgessl.probe import run_features
from edgessl.rebuild import read_state, run_config

RULES = ("graph", "graph@0.5", "graph@0.9", "typical", "herding", "kmeans", "coverage", "random")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--per-class", default="1,2,5,10")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    p = selection.pool(a.run)
    x, y = p.features, torch.as_tensor(np.asarray(p.data.labels)).long()
    test = data_lib.load_split(run_config(read_state(a.run)).data)[1]
    t = F.normalize(run_features(a.run).fn(test.images).float(), dim=1)
    ty, classes = torch.as_tensor(np.asarray(test.labels)).long(), int(y.max()) + 1
    kernel = selection.diffusion_kernel
    results, rows = {}, []
    for m in [int(v) for v in a.per_class.split(",")]:
        for rule in RULES:
            name, _, alpha = rule.partition("@")
            selection.diffusion_kernel = functools.partial(kernel, alpha=float(alpha)) if alpha else kernel
            seeds = (0,) if name in ("graph", "herding") else (0, 1, 2)
            top1, empty = [], []
            for seed in seeds:
                picked = torch.tensor(selection.pick(x, m * classes, name, seed=seed))
                means = F.normalize(torch.zeros(classes, x.shape[1]).index_add_(0, y[picked], x[picked]), dim=1)
                absent = torch.bincount(y[picked], minlength=classes) == 0
                guess = (t @ means.T).masked_fill(absent, -2.0).argmax(1)
                top1.append(100.0 * float((guess == ty).double().mean()))
                empty.append(int(absent.sum()))
            results[f"{m}/{rule}"] = {"top1": top1, "empty_classes": empty}
            rows.append([m, rule, f"{statistics.mean(top1):.2f}", " / ".join(f"{v:.2f}" for v in top1),
                         " ".join(map(str, empty))])
            print(*rows[-1], flush=True)
    selection.diffusion_kernel = kernel
    save_results(Path(a.out), results)
    print(markdown(["labels a class", "rule", "top-1, mean", "seeds", "classes unlabelled"], rows, "rlrll"))


if __name__ == "__main__":
    main()
