"""Recipe search: pretrain variants of the default recipe side by side and record kNN per run.

    .venv/bin/python scripts/recipe_search.py --epochs 20 --out runs/recipe_search.json [--only NAME ...]

Every variant runs on the same held-out split of the shared CIFAR-10 file (20%, split_seed,
default 0) with a fixed epoch count, so results do not depend on how busy the machine was;
images/s and seconds are recorded beside them. Resumable: a variant already in the JSON is
not run again. A number tuned on this split is not a test result: confirm winners with a
different --split-seed and fresh seeds.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchlib import SHARED_CIFAR, load_results, markdown, save_results
from edgessl.config import from_dict, load_yaml
from edgessl.train import pretrain

NPID = {"bank_init": "random", "sqrtkl_weight": 0.0, "cutmix_prob": 0.0}
PLAIN = {"sqrtkl_weight": 0.0, "cutmix_prob": 0.0}  # calibrated init, no SqrtKL, no CutMix
LIN = {**PLAIN, "temperature": 0.1, "bank_update": "grad", "head_dims": [128]}  # linear head (NPID's), grad
ADAMW = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}
VARIANTS = {
    "default (released recipe scaled)": {},  # the search's starting point: configs/released.yaml
    "npid tau0.2 lr0.25": {"method": NPID},
    "calibrated tau0.1 lr0.1": {"method": {**PLAIN, "temperature": 0.1}, "optim": {"lr": 0.1}},
    "calibrated tau0.1 lr0.1 grad": {"method": {**PLAIN, "temperature": 0.1, "bank_update": "grad"},
                                     "optim": {"lr": 0.1}},
    "calibrated tau0.1 lr0.1 crop0.08": {"method": {**PLAIN, "temperature": 0.1}, "optim": {"lr": 0.1},
                                         "augment": {"crop_scale": [0.08, 1.0]}},
    "calibrated tau0.1 adamw1e-3": {"method": {**PLAIN, "temperature": 0.1},
                                    "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}},
    "calibrated tau0.1 lr0.1 batch64": {"method": {**PLAIN, "temperature": 0.1},
                                        "optim": {"lr": 0.05, "batch_size": 64}},
    "calibrated tau0.1 lr0.1 m0.9": {"method": {**PLAIN, "temperature": 0.1, "bank_momentum": 0.9},
                                     "optim": {"lr": 0.1}},
    "calibrated tau0.1 lr0.1 sqrtkl5": {"method": {**PLAIN, "temperature": 0.1, "sqrtkl_weight": 5.0},
                                        "optim": {"lr": 0.1}},
    "calibrated tau0.1 grad adamw1e-3": {"method": {**PLAIN, "temperature": 0.1, "bank_update": "grad"},
                                         "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}},
    "calibrated tau0.1 grad adamw2e-3 warmup1": {"method": {**PLAIN, "temperature": 0.1, "bank_update": "grad"},
                                                 "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.05,
                                                           "warmup_epochs": 1.0}},
    "calibrated tau0.1 grad lr0.03": {"method": {**PLAIN, "temperature": 0.1, "bank_update": "grad"},
                                      "optim": {"lr": 0.03}},
    "full method tau0.1 grad adamw1e-3": {"method": {"temperature": 0.1, "bank_update": "grad"},
                                          "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}},
    "calibrated tau0.2 grad adamw1e-3": {"method": {**PLAIN, "temperature": 0.2, "bank_update": "grad"},
                                         "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}},
    "calibrated tau0.1 m0.9 adamw1e-3": {"method": {**PLAIN, "temperature": 0.1, "bank_momentum": 0.9},
                                         "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}},
    "calibrated tau0.1 grad adamw1e-3 head128": {"method": {**PLAIN, "temperature": 0.1, "bank_update": "grad",
                                                            "head_dims": [128]},
                                                 "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}},
    "supervised adamw1e-3 (labels: the ceiling)": {"method": {"name": "supervised"},
                                                   "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}},
    "simclr lightly defaults": {"method": {"name": "simclr", "temperature": 0.5, "head_dims": [512, 128]},
                                "optim": {"lr": 0.06, "weight_decay": 5e-4},
                                "augment": {"crop_scale": [0.08, 1.0]}},
    "calibrated tau0.1 grad m0.9 adamw1e-3": {"method": {**PLAIN, "temperature": 0.1, "bank_update": "grad",
                                                         "bank_momentum": 0.9},
                                              "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05}},
    "lin128 grad adamw m0.9": {"method": {**LIN, "bank_momentum": 0.9}, "optim": ADAMW},
    "lin128 grad adamw tau0.07": {"method": {**LIN, "temperature": 0.07}, "optim": ADAMW},
    "lin128 grad adamw2e-3": {"method": LIN, "optim": {**ADAMW, "lr": 2e-3}},
    "lin128 ema adamw": {"method": {**LIN, "bank_update": "ema"}, "optim": ADAMW},
    "lin128 grad adamw sqrtkl20 cutmix": {"method": {**LIN, "sqrtkl_weight": 20.0, "cutmix_prob": 1.0},
                                          "optim": ADAMW},
    "lin128 grad adamw tau0.05": {"method": {**LIN, "temperature": 0.05}, "optim": ADAMW},
    "lin128 grad adamw tau0.07 batch64": {"method": {**LIN, "temperature": 0.07}, "optim": {**ADAMW, "batch_size": 64}},
    "lin128 grad adamw tau0.07 cutmix": {"method": {**LIN, "temperature": 0.07, "cutmix_prob": 1.0}, "optim": ADAMW},
    "lin128 grad adamw tau0.03": {"method": {**LIN, "temperature": 0.03}, "optim": ADAMW},
    "lin128 grad adamw tau0.05 batch64": {"method": {**LIN, "temperature": 0.05}, "optim": {**ADAMW, "batch_size": 64}},
}


RELEASED = Path(__file__).resolve().parents[1] / "configs" / "released.yaml"
WINNER = "lin128 grad adamw tau0.07 batch64"  # = edgessl's defaults (tests/test_config.py checks)


def variant_config(overrides: dict, base: dict):
    """configs/released.yaml (every variant starts from the released recipe), then the variant."""
    cfg = from_dict(load_yaml(RELEASED))
    from_dict(base, cfg)
    for section, values in overrides.items():
        from_dict({section: values}, cfg)
    return cfg


def run_variant(name: str, overrides: dict, args, work: Path) -> dict:
    base = {"data": {"spec": args.data, "val_fraction": 0.2, "split_seed": args.split_seed},
            "optim": {"epochs": args.epochs}, "run": {"seed": args.seed, "monitor_every": args.monitor_every}}
    run_dir = work / name.replace(" ", "_")
    out = pretrain(variant_config(overrides, base), run_dir, log=lambda *_: None)
    curve = (run_dir / "metrics.csv").read_text().splitlines()
    return {**out, "overrides": overrides, "metrics_csv": curve}


def table(results: dict) -> str:
    """Markdown: one row per variant run, in VARIANTS order, kNN at the monitor epochs."""
    rows = []
    for name in VARIANTS:
        if name not in results:
            continue
        r = results[name]
        curve = [row.split(",")[-1] for row in r["metrics_csv"][1:]]
        marks = " / ".join(curve[e] or "-" for e in (5, 10, 15, 20) if e < len(curve))
        bold = "**" if name == WINNER else ""
        rows.append([f"{bold}{name}{bold}", marks, f"{r['images_per_s']:.0f}"])
    r = next(iter(results.values()))
    rows.append(["untrained network / raw pixels", f"{r['knn_untrained']:.2f} / {r['knn_pixels']:.2f}", ""])
    return markdown(["variant (from configs/released.yaml)", "kNN at epochs 5 / 10 / 15 / 20", "images/s"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"npz:{SHARED_CIFAR}")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--monitor-every", type=int, default=5)
    ap.add_argument("--only", nargs="*", help="substrings of variant names to run")
    ap.add_argument("--out", default="runs/recipe_search.json")
    ap.add_argument("--table", action="store_true", help="print the JSON's results as a markdown table and exit")
    args = ap.parse_args()
    out = Path(args.out)
    results = load_results(out)
    if args.table:
        print(table(results))
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in VARIANTS.items():
            if name in results or args.only and not any(o in name for o in args.only):
                continue
            r = run_variant(name, overrides, args, Path(tmp))
            if r.get("stopped_early"):  # SIGINT / SIGTERM: an unfinished run is not a result
                raise SystemExit(f"stopped during {name!r}; not recorded")
            results[name] = r
            save_results(out, results)
            print(f"{name:40s} kNN {r['knn_top1']:.2f}  (untrained {r['knn_untrained']:.2f}, pixels "
                  f"{r['knn_pixels']:.2f})  {r['epochs']} epochs {r['seconds']:.0f} s {r['images_per_s']:.0f} img/s",
                  flush=True)


if __name__ == "__main__":
    main()
