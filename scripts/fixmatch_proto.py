"""Prototype: FixMatch (Sohn et al. 2020) in `edgessl finetune`, over edgessl.finetuning's internals.

Each step: the labelled batch's cross-entropy (the fine-tuning crop and flip), plus on an
unlabelled batch the cross-entropy of a strong view (the pretraining run's own augmentation)
against the hard class of a weak view (a flip of the whole image) where that class's
probability is at least TAU. Same schedule as `--unlabelled propagate` (6 epochs over the
unlabelled images). Prints the top-1, the mask rate and how often the masked pseudo-labels
were right (the true labels are read for that count only, never for training).

    .venv/bin/python scripts/fixmatch_proto.py RUN_DIR --per-class 10 --seeds 0,1,2 --tau 0.95
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from edgessl import finetuning
from edgessl.augment import BatchAugment
from edgessl.config import AugmentConfig
from edgessl.data import load_split
from edgessl.device import autocast
from edgessl.runs import run_config
import edgessl

WEAK = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_prob=0.0, grayscale_prob=0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tau", type=float, default=0.95)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    cfg = edgessl.Run(args.run_dir).config
    train, _ = load_split(cfg.data)
    stats: dict = {}

    def fixmatch_loss(t, pseudo, li, ui):
        sup = finetuning.batch_loss(t, t.train.images, t.train.labels, li)
        if "strong" not in stats:
            src = run_config({"config": t.config})
            stats["strong"] = BatchAugment(src.augment, t.augment.size, t.augment.mean, t.augment.std)
            stats["weak"] = BatchAugment(WEAK, t.augment.size, t.augment.mean, t.augment.std)
        u = t.unlabelled.images[ui]
        with torch.no_grad(), autocast(t.device, t.precision):
            conf, lab = t.model(stats["weak"](u)).float().softmax(1).max(1)
        mask = (conf >= args.tau).float()
        with autocast(t.device, t.precision):
            logits = t.model(stats["strong"](u)).float()
        stats["n"] += len(ui)
        stats["kept"] += int(mask.sum())
        stats["right"] += int(((lab == stats["truth"][ui]).float() * mask).sum())
        return sup + args.weight * (F.cross_entropy(logits, lab, reduction="none") * mask).mean()

    finetuning.propagate_labels = lambda t: ()
    finetuning.semi_loss = fixmatch_loss
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in map(int, args.seeds.split(",")):
            subset = finetuning.stratified_subset(train.labels, seed, per_class=args.per_class)
            rest = torch.ones(len(train), dtype=torch.bool)
            rest[subset] = False
            stats.update(n=0, kept=0, right=0, truth=train.labels[rest])
            extra = {"epochs": args.epochs} if args.epochs else {}
            r = finetune_one(args.run_dir, Path(tmp) / str(seed), args.per_class, seed, extra)
            r.update(mask_rate=stats["kept"] / max(1, stats["n"]), pseudo_right=stats["right"] / max(1, stats["kept"]))
            results[seed] = r
            print(f"seed {seed}: top-1 {r['test_top1']:.2f}  kept {100 * r['mask_rate']:.1f}%  "
                  f"right {100 * r['pseudo_right']:.1f}%  {r['seconds']:.0f} s", flush=True)
    tops = [r["test_top1"] for r in results.values()]
    print(f"tau {args.tau} weight {args.weight}: mean {sum(tops) / len(tops):.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


def finetune_one(run_dir, out, per_class, seed, extra):
    return finetuning.finetune(run_dir, "", "", out, labels_per_class=per_class, seed=seed,
                               unlabelled="propagate", log=lambda *_: None, progress=False, **extra)


if __name__ == "__main__":
    main()
