"""Cost of one pretraining step, side by side in one process: backbone, stem, precision, head,
and the share of the step spent in the batched augmentation.

    .venv/bin/python scripts/bench_step.py --out runs/bench_step.json

Each variant runs the real train_step (augment + forward + backward + bank update) on
the shared CIFAR-10 file after a warm-up; the augmentation alone is timed on the same
batches. Writes one JSON object: machine, torch, and a row per variant.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from benchlib import SHARED_CIFAR
from edgessl.config import from_dict
from edgessl.train import build, train_step


VARIANTS = {
    "mobilenetv3 os16 fp32 (default)": {},
    "mobilenetv3 os16 fp32, augment on 2 threads": {"run": {"augment_threads": 0}},
    "mobilenetv3 os16 bf16": {"run": {"precision": "bf16"}},
    "mobilenetv3 os8 fp32": {"backbone": {"downsample": 8}},
    "mobilenetv3 os16 fp32, head 2048x3": {"method": {"head_dims": [2048, 2048, 2048]}},
    "mobilenetv3 os16 fp32, no SqrtKL/CutMix": {"method": {"sqrtkl_weight": 0.0, "cutmix_prob": 0.0}},
    "mobilenetv3 os16 fp32, grad update": {"method": {"bank_update": "grad"}},
    "mobilenetv3 os16 fp32, supervised": {"method": {"name": "supervised"}},
    "mobilenetv3 os16 fp32, simclr (2 views)": {"method": {"name": "simclr", "head_dims": [1024, 128]}},
    "mobilenetv3 os16 fp32, byol (2 views)": {"method": {"name": "byol", "head_dims": [1024, 128]}},
    "mobilenetv4 os16 fp32": {"backbone": {"name": "mobilenetv4"}},
    "resnet18 os16 fp32": {"backbone": {"name": "resnet18", "downsample": 16}},
    "resnet18 os16 fp32, supervised": {"backbone": {"name": "resnet18", "downsample": 16},
                                       "method": {"name": "supervised"}},
    "resnet18 os8 fp32 (CIFAR stem)": {"backbone": {"name": "resnet18", "downsample": 8}},
    "resnet18 os8 fp32 (CIFAR stem), supervised": {"backbone": {"name": "resnet18", "downsample": 8},
                                                   "method": {"name": "supervised"}},
}


def time_variant(overrides: dict, data: str, steps: int, batch: int) -> dict:
    base = {"data": {"spec": data}, "optim": {"batch_size": batch}, "run": {"monitor_every": 0}}
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    s = build(from_dict(base))
    s.model.train()
    n = len(s.train)
    step_s, aug_s = [], []
    for i in range(steps + 2):  # two warm-up steps
        idx = torch.randint(0, n, (batch,), device=s.device)
        t0 = time.perf_counter()
        train_step(s, idx, 0.01, i)
        t1 = time.perf_counter()
        s.augment(s.train.images[idx])
        t2 = time.perf_counter()
        if i >= 2:
            step_s.append(t1 - t0)
            aug_s.append(t2 - t1)
    step, aug = statistics.median(step_s), statistics.median(aug_s)
    return {"overrides": overrides, "steps": steps, "batch_size": batch, "step_ms": round(step * 1e3, 1),
            "images_per_s": round(batch / step, 1), "augment_ms": round(aug * 1e3, 2),
            "augment_share": round(aug / step, 4), "precision": s.precision, "device": str(s.device),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"npz:{SHARED_CIFAR}")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--only", nargs="*", help="substrings of variant names to run")
    ap.add_argument("--out", default="runs/bench_step.json")
    args = ap.parse_args()
    rows = {}
    for name, overrides in VARIANTS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        steps = max(3, args.steps // 4) if "resnet18 os8" in name else args.steps
        rows[name] = time_variant(overrides, args.data, steps, args.batch_size)
        print(f"{name:45s} {rows[name]['images_per_s']:8.1f} images/s  step {rows[name]['step_ms']:7.1f} ms  "
              f"augment {rows[name]['augment_ms']:6.2f} ms ({100 * rows[name]['augment_share']:.1f}%)", flush=True)
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "processor": platform.processor()}, "torch": str(torch.__version__), "variants": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
