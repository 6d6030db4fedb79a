"""How much of the picks' lead the fine-tune keeps: each rule's picks against uniform random draws
with no training at all, the picks' class means on the run's frozen features, tested on held-out
images (the run's own or --test). Set beside scripts/selection_bench.py's fine-tuned margins.

    .venv/bin/python scripts/selection_frozen.py RUN --per-class 2,5,10 --seeds 3,4,5 --out runs/frozen_RUN.json
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchlib import save_results
from edgessl import data as data_lib
from edgessl.probe import run_features
from edgessl.rebuild import read_state, run_config
from edgessl.selection import pick, pool


def held_out(run: str, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out images' L2-normalised features under the run's encoder, and their labels."""
    state = read_state(run)
    cfg = run_config(state).data
    data = data_lib.load(spec, state["backbone"]["image_size"], fit=cfg.fit) if spec else data_lib.load_split(cfg)[1]
    return F.normalize(run_features(run).fn(data.images).float(), dim=1), torch.as_tensor(np.asarray(data.labels))


def class_means_top1(x: torch.Tensor, y: torch.Tensor, rows: list[int], test: torch.Tensor,
                     test_y: torch.Tensor) -> float:
    """Top-1 of the nearest class mean of the labelled rows (cosine), on the test features."""
    means = torch.zeros(int(y.max()) + 1, x.shape[1]).index_add_(0, y[rows], x[rows])
    return float(((test @ F.normalize(means, dim=1).T).argmax(1) == test_y).float().mean()) * 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--per-class", default="2,5,10")
    ap.add_argument("--rules", default="graph")
    ap.add_argument("--seeds", default="3,4,5", help="random's draws")
    ap.add_argument("--test", default="", help="held-out images (default: the run's own)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    p = pool(a.run)
    y = torch.as_tensor(np.asarray(p.data.labels))
    test, test_y = held_out(a.run, a.test)
    classes = len(y.unique())
    results = {}
    for m in [int(v) for v in a.per_class.split(",")]:
        def top1(rule: str, seed: int) -> float:
            return class_means_top1(p.features, y, pick(p.features, m * classes, rule, seed=seed), test, test_y)

        random = statistics.mean(top1("random", int(s)) for s in a.seeds.split(","))
        for rule in a.rules.split(","):
            picked = top1(rule, 0)
            results[f"{m}/{rule}"] = {"top1": picked, "random": random, "lead": picked - random}
            print(m, rule, {k: round(v, 2) for k, v in results[f"{m}/{rule}"].items()}, flush=True)
    save_results(Path(a.out), results)


if __name__ == "__main__":
    main()
