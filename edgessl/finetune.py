"""Fine-tuning on a few labels: the pretrained encoder plus a linear head, trained end to end.

`--init random` trains the same network from scratch: the supervised baseline that
pretraining must beat with few labels. The result is a run directory (config, metrics.csv,
checkpoint.pt) that `edgessl export` turns into an ONNX classifier.
"""
from __future__ import annotations

import csv
import hashlib
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from edgessl import checkpoint, data as data_lib
from edgessl.augment import BatchAugment, normalize
from edgessl.backbones import create_backbone
from edgessl.config import AugmentConfig, to_dict
from edgessl.errors import EdgesslError
from edgessl.train import autocast, lr_at, resolve_device, resolve_precision

# Fine-tuning augmentation: crop and flip, no colour jitter (the usual supervised recipe).
FINETUNE_AUGMENT = AugmentConfig(crop_scale=(0.35, 1.0), jitter_prob=0.0, grayscale_prob=0.0)
FIELDS = ["epoch", "step", "loss", "lr_head", "seconds", "test_top1"]


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, C) logits
        return self.fc(self.backbone(images))


def stratified_subset(labels: torch.Tensor, seed: int, fraction: Optional[float] = None,
                      per_class: Optional[int] = None) -> torch.Tensor:
    """Sorted indices: `per_class` images of each class, or round(fraction * n_c) (at least 1)."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        k = per_class if per_class is not None else max(1, round(fraction * len(idx)))
        if k > len(idx):
            raise EdgesslError(f"class {c} has {len(idx)} labelled images, fewer than the {k} asked for")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(picked).sort().values


def load_encoder(run_dir: Path, init: str) -> tuple[nn.Module, dict, dict]:
    """The run's backbone (pretrained) or the same architecture freshly initialised (random)."""
    from edgessl.export import load_run

    model, cfg, state = load_run(run_dir)
    if init == "random":
        bb = state["backbone"]
        return create_backbone(cfg.backbone.name, bb["image_size"], bb["output_stride"]), to_dict(cfg), state
    return model.backbone, to_dict(cfg), state


def finetune(run_dir: Optional[str | Path], train_spec: str, test_spec: str, out: str | Path,
             label_fraction: Optional[float] = None, labels_per_class: Optional[int] = None,
             epochs: int = 30, seed: int = 0, init: str = "pretrained", batch_size: int = 64,
             lr: float = 0.1, backbone_lr_scale: float = 0.1, weight_decay: float = 5e-4,
             device: str = "auto", precision: str = "auto", resume: bool = False,
             progress: Optional[bool] = None, stop_at_epoch: Optional[int] = None, log=print) -> dict:
    """Fine-tune; a checkpoint is written at every epoch end. `resume=True` continues the run in
    `out` with its stored settings (the other arguments but device and precision are ignored);
    on CPU the result equals an uninterrupted run's. `stop_at_epoch` stops after that epoch's
    checkpoint (what a preemption does; the resume test uses it)."""
    out = Path(out)
    state = _resume_state(out) if resume else None
    if state is None and (out / "checkpoint.pt").exists():
        raise EdgesslError(f"{out} already holds a run; choose another --out (or --resume it)")
    if state is not None:
        ft = state["config"]["finetune"]
        train_spec, test_spec, label_fraction, labels_per_class, epochs, seed, init, batch_size, lr, \
            backbone_lr_scale, weight_decay = (ft[k] for k in (
                "train", "test", "label_fraction", "labels_per_class", "epochs", "seed", "init", "batch_size", "lr",
                "backbone_lr_scale", "weight_decay"))
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    torch.manual_seed(seed)
    if state is None:
        backbone, src_cfg, src_state = load_encoder(Path(run_dir), init)
        size, backbone_info = src_state["backbone"]["image_size"], src_state["backbone"]
    else:
        src_cfg = {k: v for k, v in state["config"].items() if k != "finetune"}
        size, backbone_info = state["backbone"]["image_size"], state["backbone"]
    train, test = data_lib.load(train_spec, size), data_lib.load(test_spec, size)
    if train.labels is None or test.labels is None:
        raise EdgesslError("fine-tuning needs labels in both --train and --test")
    subset = stratified_subset(train.labels, seed, label_fraction if labels_per_class is None else None,
                               labels_per_class)
    if state is not None and _digest(subset) != state["config"]["finetune"]["subset_sha256"]:
        raise EdgesslError(f"{train_spec} no longer gives the labelled subset this run started with; cannot resume")
    train = train.subset(subset).to(dev)
    test = test.to(dev)
    classes = train.classes or [str(c) for c in range(int(train.labels.max()) + 1)]
    model = (load_classifier(state).train() if state is not None else Classifier(backbone, len(classes))).to(dev)
    mean, std = src_cfg["data"]["mean"], src_cfg["data"]["std"]
    augment = BatchAugment(FINETUNE_AUGMENT, size, mean, std)
    bs = min(batch_size, len(train))
    steps_per_epoch = max(1, len(train) // bs)
    groups = [{"params": model.backbone.parameters(), "lr_scale": backbone_lr_scale},
              {"params": model.fc.parameters(), "lr_scale": 1.0}]
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    cfg = {**src_cfg, "finetune": {"source": str(run_dir) if state is None else state["config"]["finetune"]["source"],
                                   "train": train_spec, "test": test_spec, "label_fraction": label_fraction,
                                   "labels_per_class": labels_per_class, "epochs": epochs, "seed": seed,
                                   "init": init, "batch_size": batch_size, "lr": lr,
                                   "backbone_lr_scale": backbone_lr_scale, "weight_decay": weight_decay,
                                   "n_labelled": len(train), "subset_sha256": _digest(subset)}}
    done, step, elapsed, top1 = 0, 0, 0.0, 0.0
    if state is None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.csv", "w", newline="") as f:
            csv.writer(f).writerow(FIELDS)
    else:
        opt.load_state_dict(state["optimizer"])
        checkpoint.set_rng_state(state["rng"])
        done, step, elapsed, top1 = (state["position"][k] for k in ("epoch", "step", "seconds", "test_top1"))
        _keep_rows(out / "metrics.csv", done)
    log(f"edgessl finetune: {len(train)} labelled images ({len(subset)} of the train set, seed {seed}), "
        f"{len(classes)} classes, init {init}, {epochs} epochs{f' (from epoch {done})' if done else ''}, {dev} {prec}")
    total = epochs * steps_per_epoch
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=total, initial=step, disable=not show, leave=False, unit="step", desc="finetune")
    start = time.perf_counter() - elapsed
    for epoch in range(done + 1, epochs + 1):
        model.train()
        perm = torch.randperm(len(train), device=dev)
        loss_sum = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            base_lr = lr_at(step, total, min(steps_per_epoch, total // 10), lr)
            for g in opt.param_groups:
                g["lr"] = base_lr * g["lr_scale"]
            with autocast(dev, prec):
                loss = F.cross_entropy(model(augment(train.images[idx])).float(), train.labels[idx])
            if not torch.isfinite(loss):
                raise EdgesslError(f"loss is {loss.item()} at step {step}; stopped (the last epoch's checkpoint is kept)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            step += 1
            bar.update(1)
        top1 = evaluate(model, test, mean, std, dev, prec)
        seconds = time.perf_counter() - start
        with open(out / "metrics.csv", "a", newline="") as f:
            csv.writer(f).writerow([epoch, step, f"{loss_sum / steps_per_epoch:.6f}", f"{base_lr:.6g}",
                                    f"{seconds:.2f}", f"{top1:.2f}"])
        bar.set_postfix(top1=f"{top1:.1f}")
        checkpoint.save({"kind": "classifier", "config": cfg, "classes": classes, "model": model.state_dict(),
                         "backbone": backbone_info, "optimizer": opt.state_dict(), "rng": checkpoint.rng_state(),
                         "position": {"epoch": epoch, "step": step, "seconds": seconds, "test_top1": top1}},
                        out / "checkpoint.pt")
        if epoch == stop_at_epoch:
            break
    bar.close()
    result = {"run_dir": str(out), "test_top1": top1, "n_labelled": len(train), "epochs": epochs, "init": init,
              "seed": seed, "seconds": round(time.perf_counter() - start, 2)}
    log(f"test top-1 {top1:.2f} % after {epochs} epochs on {len(train)} labels ({out}/checkpoint.pt)")
    return result


def _resume_state(out: Path) -> dict:
    if not (out / "checkpoint.pt").exists():
        raise EdgesslError(f"nothing to resume: {out} holds no checkpoint.pt")
    state = checkpoint.load(out / "checkpoint.pt")
    if state.get("kind") != "classifier" or "optimizer" not in state:
        raise EdgesslError(f"{out}/checkpoint.pt is not a fine-tuning checkpoint that can be resumed")
    return state


def _keep_rows(path: Path, epochs: int) -> None:
    """metrics.csv keeps exactly the epochs its checkpoint covers (a kill may have added one)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= epochs]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(kept)


def _digest(index: torch.Tensor) -> str:
    return hashlib.sha256(index.numpy().astype("int64").tobytes()).hexdigest()[:16]


@torch.no_grad()
def evaluate(model: nn.Module, data, mean, std, device, precision) -> float:
    model.eval()
    correct = 0
    for imgs, labels in zip(data.images.split(256), data.labels.split(256)):
        with autocast(device, precision):
            correct += (model(normalize(imgs, mean, std)).argmax(1) == labels).sum().item()
    return 100.0 * correct / len(data)


def load_classifier(state: dict) -> Classifier:
    bb = state["backbone"]
    backbone = create_backbone(state["config"]["backbone"]["name"], bb["image_size"], bb["output_stride"])
    model = Classifier(backbone, len(state["classes"]))
    model.load_state_dict(state["model"], strict=True)
    return model.eval()

