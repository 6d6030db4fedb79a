"""Data efficiency: fine-tune a pretrained run with 1%, 10% and 100% of the labels (or N labels
per class) with the unlabelled images (`semi`: `edgessl finetune --unlabelled propagate`) and
without (`pretrained`: `--unlabelled none`), the same network from scratch (`random`), and a linear probe on the run's
frozen features of the same labelled images (`linear`), over seeds; JSON plus a PNG (accuracy
vs label fraction).

    .venv/bin/python scripts/data_efficiency.py RUN_DIR [--train SPEC --test SPEC] --out runs/data_eff.json
    .venv/bin/python scripts/data_efficiency.py RUN_DIR --per-class 10 --out runs/few_labels.json
    .venv/bin/python scripts/data_efficiency.py --table runs/data_eff.json   # Markdown from the JSON

Without --train/--test the run's own split is used: its training images as the labelled pool
and its held-out images (data.val_fraction, data.split_seed) as the test set, so no test image
was seen in pretraining. Resumable: a (fraction, init, seed) already in the JSON is not run again.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from benchlib import load_results, markdown, mean_sd, save_results
from edgessl.data import load, load_split
from edgessl.finetuning import finetune, stratified_subset
from edgessl.probe import linear_probe, run_features
import edgessl


def run_split_specs(run_dir: str, folder: Path) -> tuple[str, str]:
    """The run's train split and hold-out written as npz files: (train spec, test spec)."""
    train, val = load_split(edgessl.Run(run_dir).config.data)
    if val is None or train.labels is None:
        raise SystemExit(f"error: {run_dir} has no labelled held-out split; give --train and --test")
    specs = []
    for name, d in (("train", train), ("test", val)):
        path = folder / f"{name}.npz"
        np.savez(path, x=d.images.permute(0, 2, 3, 1).numpy(), y=d.labels.numpy())
        specs.append(f"npz:{path}")
    return specs[0], specs[1]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for init, style in (("semi", "D-"), ("pretrained", "o-"), ("random", "s--"), ("linear", "^:")):
        counts = sorted({r["n_labelled"] for r in results.values() if r["init"] == init})
        if not counts:
            continue
        accs = [[r["test_top1"] for r in results.values() if r["init"] == init and r["n_labelled"] == n]
                for n in counts]
        means = [statistics.mean(a) for a in accs]
        spreads = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
        ax.errorbar(counts, means, yerr=spreads, fmt=style, capsize=3, label=init)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("test top-1 (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict) -> str:
    """Mean +- stdev over seeds per (labels, arm), and the gain of the unlabelled images over the
    labelled ones alone."""
    def cell(labels, init):
        a = [r["test_top1"] for r in results.values() if r["labels"] == labels and r["init"] == init]
        return (statistics.mean(a), mean_sd(a), len(a)) if a else (None, "-", 0)

    rows = []
    for labels in dict.fromkeys(r["labels"] for r in results.values()):
        n = next(r["n_labelled"] for r in results.values() if r["labels"] == labels)
        (ms, s, seeds), (mp, p, _), (_, rnd, _), (_, lin, _) = (cell(labels, a) for a in
                                                                ("semi", "pretrained", "random", "linear"))
        gain = f"{ms - mp:+.2f}" if ms is not None and mp is not None else "-"
        rows.append([labels, n, s, p, gain, rnd, lin, seeds])
    return markdown(["labels", "labelled images", "with the unlabelled images", "labelled alone", "gain",
                     "from scratch", "linear probe (frozen)", "seeds"], rows, "rrllrllr")


def linear_on_subset(run_dir: str, train_spec: str, test_spec: str, seed: int, fraction, per_class) -> dict:
    """The linear probe on the run's frozen features of the labelled subset finetune would draw."""
    f = run_features(run_dir)
    train, test = load(train_spec, f.size, fit=f.fit), load(test_spec, f.size, fit=f.fit)
    sub = train.subset(stratified_subset(train.labels, seed, fraction, per_class))
    classes = int(max(train.labels.max(), test.labels.max())) + 1
    top1, wd = linear_probe(f.fn(sub.images).float(), sub.labels, f.fn(test.images).float(), test.labels, classes)
    return {"test_top1": top1, "weight_decay": wd, "n_labelled": len(sub), "epochs": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--table", metavar="JSON", help="print the Markdown table of a result file and exit")
    ap.add_argument("--train", help="labelled pool (default: the run's training split)")
    ap.add_argument("--test", help="test set (default: the run's held-out split)")
    ap.add_argument("--fractions", default="0.01,0.1,1.0")
    ap.add_argument("--per-class", help="labels per class instead of fractions, e.g. 10 or 5,10")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, help="fine-tuning epochs (default: each arm's, edgessl finetune's auto)")
    ap.add_argument("--arms", default="semi,pretrained,random,linear", help="which of semi, pretrained, random, "
                    "linear to run")
    ap.add_argument("--out", default="runs/data_efficiency.json")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if not args.run_dir:
        ap.error("RUN_DIR is required (or --table JSON)")
    out = Path(args.out)
    results = load_results(out)
    with tempfile.TemporaryDirectory() as tmp:
        if not (args.train and args.test):
            args.train, args.test = run_split_specs(args.run_dir, Path(tmp))
        amounts = ([(None, int(k), f"{k}/class") for k in args.per_class.split(",")] if args.per_class else
                   [(float(f), None, f"{100 * float(f):g}%") for f in args.fractions.split(",")])
        for fraction, per_class, labels in amounts:
            for init in args.arms.split(","):
                for seed in map(int, args.seeds.split(",")):
                    key = f"{labels}/{init}/{seed}" if per_class else f"{fraction}/{init}/{seed}"
                    if key in results:
                        continue
                    if init == "linear":
                        r = linear_on_subset(args.run_dir, args.train, args.test, seed, fraction, per_class)
                    else:
                        epochs = {"epochs": args.epochs} if args.epochs else {}
                        r = finetune(args.run_dir, args.train, args.test, Path(tmp) / key.replace("/", "_"),
                                     label_fraction=fraction, labels_per_class=per_class, seed=seed,
                                     init="random" if init == "random" else "pretrained",
                                     unlabelled="propagate" if init == "semi" else "none", log=lambda *_: None,
                                     **epochs)
                    results[key] = {**r, "fraction": fraction, "labels": labels, "init": init}
                    save_results(out, results)
                    print(f"{key:22s} test top-1 {r['test_top1']:.2f} % ({r['n_labelled']} labels)", flush=True)
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
