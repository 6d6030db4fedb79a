"""Data efficiency: fine-tune a pretrained run with 1%, 10% and 100% of the labels, and the same
network from scratch, over seeds; JSON plus a PNG (accuracy vs label fraction).

    .venv/bin/python scripts/data_efficiency.py RUN_DIR [--train SPEC --test SPEC] --out runs/data_eff.json
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
from edgessl.config import FinetuneConfig
from edgessl.finetuning import finetune
from edgessl.data import load_split
from edgessl.train import config_from_checkpoint


def run_split_specs(run_dir: str, folder: Path) -> tuple[str, str]:
    """The run's train split and hold-out written as npz files: (train spec, test spec)."""
    train, val = load_split(config_from_checkpoint(run_dir).data)
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
    for init, style in (("pretrained", "o-"), ("random", "s--")):
        fracs = sorted({r["fraction"] for r in results.values() if r["init"] == init})
        accs = [[r["test_top1"] for r in results.values() if r["init"] == init and r["fraction"] == f] for f in fracs]
        means = [statistics.mean(a) for a in accs]
        spreads = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
        ax.errorbar([100 * f for f in fracs], means, yerr=spreads, fmt=style, capsize=3, label=init)
    ax.set_xscale("log")
    ax.set_xlabel("labelled fraction of the train set (%)")
    ax.set_ylabel("test top-1 (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: dict) -> str:
    """Mean +- stdev over seeds per (fraction, init), and the gain of pretraining."""
    def cell(fraction, init):
        a = [r["test_top1"] for r in results.values() if r["fraction"] == fraction and r["init"] == init]
        if not a:
            return None, "-"
        return statistics.mean(a), mean_sd(a)

    rows = []
    for fraction in sorted({r["fraction"] for r in results.values()}):
        any_r = next(r for r in results.values() if r["fraction"] == fraction)
        n, bs = any_r["n_labelled"], FinetuneConfig().batch_size
        steps = any_r["epochs"] * max(1, n // min(bs, n))
        (mp, p), (mr, r) = cell(fraction, "pretrained"), cell(fraction, "random")
        gain = f"{mp - mr:+.2f}" if mp is not None and mr is not None else "-"
        seeds = sum(1 for x in results.values() if x["fraction"] == fraction and x["init"] == "pretrained")
        rows.append([f"{100 * fraction:g}%", any_r["n_labelled"], steps, p, r, gain, seeds])
    return markdown(["labels", "labelled images", "steps", "pretrained", "from scratch", "gain", "seeds"], rows,
                    "rrrllrr")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--table", metavar="JSON", help="print the Markdown table of a result file and exit")
    ap.add_argument("--train", help="labelled pool (default: the run's training split)")
    ap.add_argument("--test", help="test set (default: the run's held-out split)")
    ap.add_argument("--fractions", default="0.01,0.1,1.0")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=30)
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
        for fraction in map(float, args.fractions.split(",")):
            for init in ("pretrained", "random"):
                for seed in map(int, args.seeds.split(",")):
                    key = f"{fraction}/{init}/{seed}"
                    if key in results:
                        continue
                    r = finetune(args.run_dir, args.train, args.test, Path(tmp) / key.replace("/", "_"),
                                 label_fraction=fraction, epochs=args.epochs, seed=seed, init=init,
                                 log=lambda *_: None)
                    results[key] = {**r, "fraction": fraction}
                    save_results(out, results)
                    print(f"{key:22s} test top-1 {r['test_top1']:.2f} % ({r['n_labelled']} labels)", flush=True)
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
