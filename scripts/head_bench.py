"""A few labels: the default fine-tune against the frozen encoder's nearest class mean, on a tuning split.

A fixed fifth of the run's training images is held out (the selection tuning split); `select`'s
rule picks N = m x classes of the rest; the default `edgessl finetune --labels` on the picks is
tested on that fifth beside a nearest-class-mean classifier on the frozen features (cosine to
each class's mean normalised feature; nothing trains). The arm `oracle` (class means only) is a
ceiling, not a rule: it reads the labels and takes each class's m images nearest its mean.
Writes JSON (resumable), prints a table.

    .venv/bin/python scripts/head_bench.py runs/c15 --arms typical:0,random:0 --out runs/head_c15.json
    .venv/bin/python scripts/head_bench.py runs/f102 --arms oracle:0,typical:0,random:0 --means-only --out runs/h.json
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchlib import load_results, markdown, save_results
import edgessl
from edgessl.selection import pick, pool


def split(run: str, tmp: Path):
    """The run's pool, its tuning rows and held-out fifth, both written as npz files."""
    p = pool(run)
    y = torch.as_tensor(p.data.labels).long()
    held = torch.randperm(len(y), generator=torch.Generator().manual_seed(100))[: len(y) // 5]
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[held] = False
    x = p.data.images.permute(0, 2, 3, 1).numpy()
    for name, rows in (("tr", rest.nonzero().flatten()), ("te", held)):
        np.savez(tmp / f"{name}.npz", x_train=x[rows.numpy()], y_train=y[rows].numpy())
    return p, y, rest.nonzero().flatten(), held


def oracle(x: torch.Tensor, y: torch.Tensor, m: int) -> torch.Tensor:
    """Each class's m rows nearest its mean (a ceiling that reads the labels)."""
    out = []
    for c in y.unique():
        rows = (y == c).nonzero().flatten()
        out.append(rows[(x[rows] @ F.normalize(x[rows].mean(0), dim=0)).argsort(descending=True)[:m]])
    return torch.cat(out)


def finetune(run: str, tmp: Path, picked: torch.Tensor, labels: torch.Tensor, name: str) -> dict:
    """The default fine-tune on the picks (rows of tr.npz), tested on te.npz."""
    (tmp / "l.csv").write_text("path,label\n" + "".join(f"{int(i)},{int(c)}\n" for i, c in zip(picked, labels)))
    s = edgessl.finetune(run, f"npz:{tmp / 'tr.npz'}", f"npz:{tmp / 'te.npz'}", tmp / f"ft{name}",
                         labels=str(tmp / "l.csv"), progress=False, log=lambda *_: None).summary
    return {"finetune": s["test_top1"], "unlabelled": s["unlabelled"], "seconds": s["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--per-class", default="1,2,5,10")
    ap.add_argument("--arms", default="typical:0,random:0", help="rule:seed pairs (rule: select's, or oracle)")
    ap.add_argument("--means-only", action="store_true", help="the class means alone (no fine-tune)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    results = load_results(Path(a.out))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        p, y, rows, held = split(a.run, tmp)
        x, classes = p.features[rows], len(p.data.classes)
        for m in [int(v) for v in a.per_class.split(",")]:
            for arm in a.arms.split(","):
                rule, seed = arm.split(":")
                if f"{m}/{arm}" in results:
                    continue
                picked = oracle(x, y[rows], m) if rule == "oracle" else torch.tensor(pick(x, m * classes, rule,
                                                                                            seed=int(seed)))
                yr = y[rows][picked]
                means = F.normalize(torch.zeros(classes, x.shape[1]).index_add_(0, yr, x[picked]))
                absent = torch.bincount(yr, minlength=classes) == 0
                nearest = (p.features[held] @ means.T).masked_fill(absent, -2.0).argmax(1)
                r = results[f"{m}/{arm}"] = {"means": 100.0 * (nearest == y[held]).double().mean().item()}
                if not (a.means_only or rule == "oracle"):
                    r.update(finetune(a.run, tmp, picked, yr, f"{m}{rule}{seed}"))
                save_results(Path(a.out), results)
                print(f"{m}/{arm}", r, flush=True)
    rows = [[k, f"{v['means']:.2f}", *([f"{v['finetune']:.2f}", f"{v['means'] - v['finetune']:+.2f}", v["unlabelled"]]
                                       if "finetune" in v else ["-", "-", "-"])] for k, v in results.items()]
    print(markdown(["labels a class / arm", "class means", "fine-tune", "means - fine-tune", "unlabelled"], rows,
                   "lrrrl"))


if __name__ == "__main__":
    main()
