"""Which images to label: each `edgessl select` rule against uniform random draws, on a run's images.

tune: a fixed fifth of the run's training images is held out; each rule picks N = m x classes of
the rest, and a nearest-class-mean classifier on the run's frozen features of the picks is tested on
that fifth (seconds a rule: for choosing the default on tuning splits). finetune: the default
`edgessl finetune --labels` on a rule's picks against the same fine-tune on uniform random draws
(`--rule random`) and on the class-balanced draw of --labels-per-class, tested on the run's held-out
images (or --test). Either writes JSON (resumable) and prints a Markdown table.

    .venv/bin/python scripts/selection_bench.py tune RUN --per-class 1,2,5,10 --seeds 0,1,2 --out runs/sel_tune.json
    .venv/bin/python scripts/selection_bench.py finetune RUN --rules typical,random,balanced --seeds 3,4,5 --out runs/sel.json
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchlib import load_results, markdown, mean_sd, save_results
from edgessl.config import SELECT_RULES
from edgessl.selection import pick, pool
import edgessl


def tune(run: str, m: int, rule: str, seed: int) -> dict:
    """Nearest-class-mean top-1 on a held-out fifth of the run's training images, from the picks."""
    p = pool(run)
    y = p.data.labels
    held = torch.randperm(len(y), generator=torch.Generator().manual_seed(100))[: len(y) // 5]
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[held] = False
    rows = rest.nonzero().flatten()
    classes, x = len(p.data.classes), p.features[rows]
    budget = m * classes
    if rule in ("twice", "uncertain"):  # two rounds of half the budget; the second from the first's classifier
        first = pick(x, budget // 2, "typical", seed=seed)
        rest = budget - len(first)
        if rule == "twice":
            second = pick(x, rest, "typical", labelled=first, seed=seed)
        else:  # the least certain (smallest margin) of 3x as many diverse candidates
            candidates = torch.tensor(pick(x, min(3 * rest, len(x) - len(first)), "typical", labelled=first,
                                           seed=seed))
            top2 = nearest_mean(p.features, rows[first], y, classes)(x[candidates]).topk(2, dim=1).values
            second = candidates[(top2[:, 0] - top2[:, 1]).argsort()[:rest]].tolist()
        picked = rows[first + second]
    else:
        picked = rows[pick(x, budget, rule, seed=seed)]
    scores = nearest_mean(p.features, picked, y, classes)(p.features[held])
    return {"top1": 100.0 * (scores.argmax(1) == y[held]).double().mean().item(),
            "empty_classes": classes - len(y[picked].unique())}


def nearest_mean(features: torch.Tensor, picked: torch.Tensor, y: torch.Tensor, classes: int):
    """Cosine scores against the picks' normalised class means (a class without picks: never chosen)."""
    means = torch.zeros(classes, features.shape[1]).index_add_(0, y[picked], features[picked])
    absent = torch.bincount(y[picked], minlength=classes) == 0

    def scores(q: torch.Tensor) -> torch.Tensor:
        return (q @ torch.nn.functional.normalize(means, dim=1).T).masked_fill(absent, -2.0)

    return scores


def finetune(run: str, m: int, rule: str, seed: int, train: str, test: str) -> dict:
    """The default fine-tune on N = m x classes images picked by `rule` (balanced: m per class)."""
    p = pool(run)
    classes = p.data.classes
    with tempfile.TemporaryDirectory() as tmp:
        quiet = dict(progress=False, log=lambda *_: None)
        if rule == "balanced":
            r = edgessl.finetune(run, train, test, Path(tmp) / "ft", labels_per_class=m, seed=seed, **quiet).summary
            return {"top1": r["test_top1"], "empty_classes": 0, "unlabelled": r["unlabelled"]}
        chosen = edgessl.Run(run).select(m * len(classes), rule=rule, seed=seed)
        picks = chosen["picks"]
        label = {name: classes[int(c)] for name, c in zip(p.names, p.data.labels)}
        csv = Path(tmp) / "labels.csv"
        csv.write_text("path,label\n" + "".join(f'"{q}",{label[q]}\n' for q in picks))
        r = edgessl.finetune(run, train, test, Path(tmp) / "ft", labels=str(csv), **quiet).summary
        return {"top1": r["test_top1"], "empty_classes": len(classes) - len({label[q] for q in picks}),
                "unlabelled": r["unlabelled"], "select_seconds": chosen["select_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("tune", "finetune"))
    ap.add_argument("run")
    ap.add_argument("--per-class", default="1,2,5,10", help="budgets: N = m x the number of classes")
    ap.add_argument("--rules", default=",".join(SELECT_RULES),
                    help="rules (tune also: twice, uncertain: two rounds; finetune also: balanced)")
    ap.add_argument("--seeds", default="0,1,2", help="the draws (random, balanced) or the clusterings' seeds")
    ap.add_argument("--train", default="", help="finetune: labelled training images (default: the run's own)")
    ap.add_argument("--test", default="", help="finetune: test images (default: the run's held-out images)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    results = load_results(Path(a.out))
    for m in [int(v) for v in a.per_class.split(",")]:
        for rule in a.rules.split(","):
            for seed in [int(v) for v in a.seeds.split(",")]:
                key = f"{m}/{rule}/{seed}"
                if key not in results:
                    results[key] = (tune(a.run, m, rule, seed) if a.mode == "tune" else
                                    finetune(a.run, m, rule, seed, a.train, a.test))
                    save_results(Path(a.out), results)
                    print(key, results[key], flush=True)
    print(table(results))


def table(results: dict) -> str:
    budgets = sorted({int(k.split("/")[0]) for k in results})
    rules = list(dict.fromkeys(k.split("/")[1] for k in results))

    def cell(m, rule, field):
        return [v[field] for k, v in results.items() if k.startswith(f"{m}/{rule}/")]

    rows = []
    for m in budgets:
        random = cell(m, "random", "top1")
        for rule in rules:
            top1 = cell(m, rule, "top1")
            gain = mean_sd([t - sum(random) / len(random) for t in top1], sign="+") if random else "-"
            rows.append([m, rule, " / ".join(f"{t:.2f}" for t in top1), mean_sd(top1), gain,
                         mean_sd(cell(m, rule, "empty_classes"), 1)])
    return markdown(["labels a class", "rule", "draws", "top-1", "against random's mean", "classes unlabelled"],
                    rows, "rlllrr")


if __name__ == "__main__":
    main()
