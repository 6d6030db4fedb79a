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
import json
import tempfile
from pathlib import Path

from edgessl.config import from_dict
from edgessl.train import pretrain

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-5k-train.npz"
NPID = {"bank_init": "random", "sqrtkl_weight": 0.0, "cutmix_prob": 0.0}
PLAIN = {"sqrtkl_weight": 0.0, "cutmix_prob": 0.0}  # calibrated init, no SqrtKL, no CutMix
VARIANTS = {
    "default (released recipe scaled)": {},
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
}


def run_variant(name: str, overrides: dict, args, work: Path) -> dict:
    base = {"data": {"spec": args.data, "val_fraction": 0.2, "split_seed": args.split_seed},
            "optim": {"epochs": args.epochs}, "run": {"seed": args.seed, "monitor_every": args.monitor_every}}
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    run_dir = work / name.replace(" ", "_")
    out = pretrain(from_dict(base), run_dir, log=lambda *_: None)
    curve = (run_dir / "metrics.csv").read_text().splitlines()
    return {**out, "overrides": overrides, "metrics_csv": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"npz:{SHARED}")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--monitor-every", type=int, default=5)
    ap.add_argument("--only", nargs="*", help="substrings of variant names to run")
    ap.add_argument("--out", default="runs/recipe_search.json")
    args = ap.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in VARIANTS.items():
            if name in results or args.only and not any(o in name for o in args.only):
                continue
            r = run_variant(name, overrides, args, Path(tmp))
            results[name] = r
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
            print(f"{name:40s} kNN {r['knn_top1']:.2f}  (untrained {r['knn_untrained']:.2f}, pixels "
                  f"{r['knn_pixels']:.2f})  {r['epochs']} epochs {r['seconds']:.0f} s {r['images_per_s']:.0f} img/s",
                  flush=True)


if __name__ == "__main__":
    main()
