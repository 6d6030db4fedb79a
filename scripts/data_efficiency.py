"""Data efficiency: fine-tune a pretrained run with 1%, 10% and 100% of the labels, and the same
network from scratch, over seeds; JSON plus a PNG (accuracy vs label fraction).

    .venv/bin/python scripts/data_efficiency.py RUN_DIR --train SPEC --test SPEC --out runs/data_eff.json

Resumable: a (fraction, init, seed) already in the JSON is not run again.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from edgessl.finetune import finetune


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--fractions", default="0.01,0.1,1.0")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default="runs/data_efficiency.json")
    args = ap.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
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
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(results, indent=1))
                    print(f"{key:22s} test top-1 {r['test_top1']:.2f} % ({r['n_labelled']} labels)", flush=True)
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
