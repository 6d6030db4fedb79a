"""Which images to label: each `edgessl select` rule against uniform random draws, on a run's images.

The default `edgessl finetune --labels` on a rule's picks (N = m x the classes, labelled with the
images' known labels) against the same fine-tune on uniform random draws (`--rule random`) and on
the class-balanced draw of --labels-per-class, tested on the run's held-out images (or --test).
Writes JSON (resumable) and prints a Markdown table.

    .venv/bin/python scripts/selection_bench.py RUN --rules graph,random,balanced --seeds 3,4,5 --out runs/sel.json
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchlib import load_results, markdown, mean_sd, save_results
import edgessl


def classes_of(run: str) -> int:
    """The classes among the run's training images (their labels, as select knows them)."""
    r = edgessl.Run(run)
    return len(set(r.select(r.select(1, rule="random")["pool"], rule="random")["known_labels"]))


def finetune(run: str, m: int, rule: str, seed: int, train: str, test: str, unlabelled: str = "auto",
             finetune_seed: int = 0) -> dict:
    """The default fine-tune (seeded with `finetune_seed`) on N = m x classes images picked by `rule`
    (balanced: m per class, the draw and the fine-tune seeded with `seed`)."""
    classes = classes_of(run)
    with tempfile.TemporaryDirectory() as tmp:
        quiet = dict(progress=False, log=lambda *_: None, unlabelled=unlabelled)
        if rule == "balanced":
            r = edgessl.finetune(run, train, test, Path(tmp) / "ft", labels_per_class=m, seed=seed, **quiet).summary
            return {"top1": r["test_top1"], "empty_classes": 0, "unlabelled": r["unlabelled"]}
        chosen = edgessl.Run(run).select(m * classes, rule=rule, seed=seed)
        picks, labels = chosen["picks"], chosen["known_labels"]
        csv = Path(tmp) / "labels.csv"
        csv.write_text("path,label\n" + "".join(f'"{q}",{label}\n' for q, label in zip(picks, labels)))
        r = edgessl.finetune(run, train, test, Path(tmp) / "ft", labels=str(csv), seed=finetune_seed, **quiet).summary
        return {"top1": r["test_top1"], "empty_classes": classes - len(set(labels)),
                "unlabelled": r["unlabelled"], "select_seconds": chosen["select_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--per-class", default="1,2,5,10", help="budgets: N = m x the number of classes")
    ap.add_argument("--rules", default="graph,typical,herding,random",
                    help="select's rules, and balanced: the draw of --labels-per-class")
    ap.add_argument("--seeds", default="0,1,2", help="the draws (random, balanced) or the clusterings' seeds")
    ap.add_argument("--finetune-seeds", default="0", help="each pick's fine-tune seeds (a rule without a seed, "
                    "graph or herding, varies only by these); a seed other than 0 is named SEED+FINETUNE_SEED")
    ap.add_argument("--train", default="", help="finetune: labelled training images (default: the run's own)")
    ap.add_argument("--test", default="", help="finetune: test images (default: the run's held-out images)")
    ap.add_argument("--unlabelled", default="auto", help="finetune's --unlabelled; other than auto, a row's rule "
                    "is named RULE:MODE")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    results = load_results(Path(a.out))
    for m in [int(v) for v in a.per_class.split(",")]:
        for rule in a.rules.split(","):
            for seed, fseed in [(int(s), int(f)) for s in a.seeds.split(",") for f in a.finetune_seeds.split(",")]:
                key = f"{m}/{rule if a.unlabelled == 'auto' else rule + ':' + a.unlabelled}/{seed}"
                key += f"+{fseed}" if fseed else ""
                if key not in results:
                    results[key] = finetune(a.run, m, rule, seed, a.train, a.test, a.unlabelled, fseed)
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
