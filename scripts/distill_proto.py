"""Prototype: SimCLRv2's distillation (Chen et al. 2020) in `edgessl finetune`, over edgessl.finetuning.

For each label draw: a teacher fine-tuned on the labelled images alone (the default, 30 epochs);
then a student from the same pretrained encoder, trained for 6 epochs over the unlabelled images
(the schedule of `--unlabelled propagate`): each step the labelled batch's cross-entropy plus the
cross-entropy of the student's prediction on an augmented unlabelled batch against the teacher's
softened distribution (temperature T) on the unaugmented images. Prints teacher and student top-1
and how often the teacher's class was right on the unlabelled images (counted, never trained on).

    .venv/bin/python scripts/distill_proto.py RUN_DIR --per-class 10 --seeds 0,1,2 --temperature 1
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from edgessl import checkpoint, finetuning
from edgessl.augment import normalize
from edgessl.data import load_split
from edgessl.device import autocast
from edgessl.runs import build_classifier
import edgessl


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    cfg = edgessl.Run(args.run_dir).config
    train, _ = load_split(cfg.data)
    teacher: dict = {}

    @torch.no_grad()
    def teacher_targets(t):
        if "soft" not in teacher:
            model = teacher["model"].to(t.device).eval()
            mean, std = finetuning._norm(t.config)
            with autocast(t.device, t.precision):
                logits = torch.cat([model(normalize(c, mean, std)).float() for c in t.unlabelled.images.split(256)])
            teacher["soft"] = (logits / args.temperature).softmax(1)
            teacher["right"] = (logits.argmax(1).cpu() == teacher["truth"]).float().mean().item()
        return (teacher["soft"],)

    def distill_loss(t, pseudo, li, ui):
        sup = finetuning.batch_loss(t, t.train.images, t.train.labels, li)
        with autocast(t.device, t.precision):
            logits = t.model(t.augment(t.unlabelled.images[ui])).float()
        return sup + F.cross_entropy(logits / args.temperature, pseudo[0][ui])

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in map(int, args.seeds.split(",")):
            subset = finetuning.stratified_subset(train.labels, seed, per_class=args.per_class)
            rest = torch.ones(len(train), dtype=torch.bool)
            rest[subset] = False
            teacher.clear()
            teacher["truth"] = train.labels[rest]
            common = dict(labels_per_class=args.per_class, seed=seed, log=lambda *_: None, progress=False)
            first = finetuning.finetune(args.run_dir, "", "", Path(tmp) / f"teacher{seed}", **common)
            teacher["model"] = build_classifier(checkpoint.load(Path(tmp) / f"teacher{seed}" / "checkpoint.pt"))
            finetuning.propagate_labels, finetuning.semi_loss = teacher_targets, distill_loss
            try:
                r = finetuning.finetune(args.run_dir, "", "", Path(tmp) / f"student{seed}", unlabelled="propagate",
                                        **common)
            finally:
                finetuning.propagate_labels, finetuning.semi_loss = PROPAGATE, SEMI
            results[seed] = {"teacher": first["test_top1"], "student": r["test_top1"], "seconds": r["seconds"],
                             "teacher_right_unlabelled": teacher["right"]}
            print(f"seed {seed}: teacher {first['test_top1']:.2f}  student {r['test_top1']:.2f}  teacher right on "
                  f"unlabelled {100 * teacher['right']:.1f}%  {r['seconds']:.0f} s", flush=True)
    for k in ("teacher", "student"):
        print(f"{k} mean {sum(r[k] for r in results.values()) / len(results):.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


PROPAGATE, SEMI = finetuning.propagate_labels, finetuning.semi_loss

if __name__ == "__main__":
    main()
