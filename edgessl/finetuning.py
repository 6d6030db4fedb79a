"""Fine-tuning on a few labels: the pretrained encoder plus a linear head, trained end to end.

`init="random"` trains the same network from scratch: the supervised baseline that
pretraining must beat with few labels. The result is a run directory (config, metrics.csv,
checkpoint.pt) that `edgessl export` turns into an ONNX classifier.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import hashlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from edgessl import checkpoint, data as data_lib, loop
from edgessl.augment import BatchAugment
from edgessl.config import AUTO, AugmentConfig, FinetuneConfig, finetune_config, to_dict
from edgessl.depthwise import fast_depthwise
from edgessl.features import features
from edgessl.device import autocast, grad_scaler, resolve_device, resolve_precision
from edgessl.errors import EdgesslError
from edgessl.optim import guarded_step, make_optimizer, param_groups, set_lr
from edgessl.runfiles import CsvLog, check_run_dir, run_lock
from edgessl.rebuild import (Classifier, build_classifier, check_run_data, data_record, is_classifier, load_encoder,
                          run_config)
from edgessl.loop import Position, Step, Steps
from edgessl.schedule import lr_at
from edgessl.semi import held_out_duel, propagate, sign_test

# Fine-tuning augmentation: crop and flip, no colour jitter (the usual supervised recipe).
FINETUNE_AUGMENT = AugmentConfig(crop_scale=(0.35, 1.0), jitter_prob=0.0, grayscale_prob=0.0)
FIELDS = ["epoch", "step", "loss", "lr_head", "seconds", "test_top1"]
RUN_ONLY = ("device", "precision")  # settings a resume may change: where it runs, not what it learns
LABELLED_EPOCHS = 30  # epochs over the labelled images alone (--unlabelled none)
SEMI_EPOCHS = 6  # epochs over the unlabelled images (their cost: docs/benchmarks.md, "Few labels")
UNLABELLED_WEIGHT = 1.0  # the pseudo-labelled loss against the labelled one
AUTO_MIN_PER_CLASS = 5  # --unlabelled auto propagates from this many labelled images a class on average
AUTO_P = 0.05  # and below it when held-out labels say propagation beats the class means (unlabelled_mode)
TEST_SHARE = 0.25  # the test passes cost at most this share of the training (a trained image costs ~3 tested)


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


@dataclass
class Source:
    """The pretraining run a classifier starts from."""

    config: dict  # its resolved config
    backbone: dict  # how its backbone is built (timm name, stem, input size)
    path: str
    data: Optional[dict]  # what its checkpoint records of its images (their identity)


@dataclass
class Tuning:
    """Everything a fine-tuning run trains with, built (and every input checked) before it starts."""

    ft: FinetuneConfig
    model: Classifier
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    augment: BatchAugment
    train: data_lib.ImageData  # the labelled subset, on the device
    test: data_lib.ImageData
    classes: list
    config: dict  # what the checkpoint stores: the source's config and the `finetune` section
    backbone: dict
    identity: dict
    device: torch.device
    precision: str
    batch: int  # labelled images a step
    steps_per_epoch: int
    epochs: int  # ft.epochs resolved
    unlabelled: Optional[data_lib.ImageData] = None  # their labels stripped: never read
    unlabelled_batch: int = 0
    unlabelled_why: str = ""  # what --unlabelled auto decided from

    @property
    def test_every(self) -> int:
        """Epochs between two test passes: every epoch, unless the test set is large beside an epoch
        (a few labels alone: one-step epochs, whose 30 test passes were most of the run); the last
        epoch is always tested."""
        trained = self.steps_per_epoch * (self.batch + self.unlabelled_batch)
        return max(1, math.ceil(len(self.test) / (TEST_SHARE * 3 * trained))) if self.test is not None else 1


def finetune(run_dir: Optional[str | Path], train_spec: str = "", test_spec: str = "", out: str | Path = "",
             label_fraction: Optional[float] = None, labels_per_class: Optional[int] = None, *,
             resume: bool = False, progress: Optional[bool] = None, stop_at_step: Optional[int] = None,
             log=print, **settings) -> dict:
    """Fine-tune `run_dir`'s encoder on labelled `train_spec`, test on `test_spec`, write the run
    to `out`; `settings` are FinetuneConfig keys (epochs, seed, init, batch_size, lr, ...).

    A checkpoint is written at every epoch end, and on SIGINT / SIGTERM at the next step
    (edgessl.loop). `resume=True` continues the run in `out` with its stored settings (only
    device and precision may be given); on CPU the result equals an uninterrupted run's.
    `stop_at_step` checkpoints and stops there (what a preemption does; the resume test uses
    it). The run directory is locked while it trains."""
    out = Path(out)
    check_run_dir(out, resume)
    state = _resume_state(out) if resume else None
    if state is None:
        if label_fraction is None and labels_per_class is None and not settings.get("labels"):
            label_fraction = 1.0
        if settings.get("labels"):  # stored absolute, as the specs: a resume from anywhere reads the same files
            settings["labels"] = os.path.abspath(settings["labels"])
        ft = finetune_config({"train": data_lib.absolute(train_spec), "test": data_lib.absolute(test_spec),
                              "label_fraction": label_fraction, "labels_per_class": labels_per_class, **settings})
        torch.manual_seed(ft.seed)  # a random init (and the new head) are drawn from the run's seed
        encoder, src_cfg, src_state = load_encoder(run_dir, ft.init)
        source = Source(to_dict(src_cfg), src_state["backbone"], os.path.abspath(run_dir), src_state.get("data"))
    else:
        stored = state["config"]["finetune"]
        names = {f.name for f in dataclasses.fields(FinetuneConfig)}
        ft = finetune_config({**{k: v for k, v in stored.items() if k in names and k not in RUN_ONLY},
                              **{k: v for k, v in settings.items() if k in RUN_ONLY}})
        source = Source({k: v for k, v in state["config"].items() if k != "finetune"}, state["backbone"],
                        stored["source"], None)
        encoder = None
    t = build(ft, source, state, encoder)
    with run_lock(out):
        check_run_dir(out, resume, locked=True)  # a run that ended in `out` while this one was being built
        return _train(t, out, state, progress, stop_at_step, log)


def build(ft: FinetuneConfig, source: Source, state: Optional[dict], encoder: Optional[nn.Module]) -> Tuning:
    """The labelled subset, the classifier, its optimizer and augmentation; a resumed run's state loaded."""
    dev = resolve_device(ft.device)
    train, test = labelled_sets(ft, source.config, source.backbone["image_size"])
    if state is not None:  # the labelled images must be the ones this run started on
        check_run_data(state, train, test, "--resume")
    elif not ft.train:  # the pretraining run's own split: still its images
        check_run_data({"data": source.data}, train, test, "finetune")
    identity = data_record(train, test)
    if ft.labels:
        train, subset = user_labels(ft, source.config, train, test)
    else:
        subset = stratified_subset(train.labels, ft.seed, ft.label_fraction if ft.labels_per_class is None else None,
                                   ft.labels_per_class)
    digest = _digest(subset, train.labels if ft.labels else None)
    if state is not None and digest != state["config"]["finetune"]["subset_sha256"]:
        raise EdgesslError(f"{ft.train or 'the pretraining run split'} no longer gives the labelled subset this run "
                           "started with; cannot resume")
    prec = resolve_precision(ft.precision, dev)
    pool = unlabelled_pool(ft, source.config, train, subset) if ft.unlabelled != "none" else None
    duel = None if pool is None else lambda: pool_duel(encoder, train.subset(subset), pool, source.config, dev,
                                                       prec, ft.seed)
    mode, why = unlabelled_mode(ft.unlabelled, train.labels[subset], duel)
    unlabelled = pool if mode == "propagate" else None
    if mode == "propagate" and unlabelled is None:
        why = f"{why + ', but ' if why else ''}every training image is labelled"
    ft = dataclasses.replace(ft, unlabelled="none" if unlabelled is None else "propagate")  # stored resolved
    train, test = train.subset(subset).to(dev), test.to(dev) if test is not None else None
    classes = train.classes or [str(c) for c in range(int(train.labels.max()) + 1)]
    model = (build_classifier(state) if state is not None else Classifier(encoder, len(classes))).to(dev).train()
    run = source.config["run"]  # the pretraining run's kernel settings, as its own steps used them
    if dev.type == "cpu" and run.get("fast_depthwise", True):
        fast_depthwise(model)  # the faster CPU backward of depthwise convolutions (edgessl.depthwise)
    groups = param_groups(model, ft.weight_decay, {model.backbone: ft.backbone_lr_scale, model.fc: 1.0})
    stored = {k: v for k, v in dataclasses.asdict(ft).items() if k not in RUN_ONLY}
    bs = min(ft.batch_size, len(train))
    semi = unlabelled is not None
    ub = min(ft.batch_size, len(unlabelled)) if semi else 0
    epochs = ft.epochs if ft.epochs != AUTO else SEMI_EPOCHS if semi else LABELLED_EPOCHS
    return Tuning(ft, model, make_optimizer(groups, "sgd", ft.lr, nesterov=True,
                                             fused=source.config["optim"].get("fused", True)), grad_scaler(dev, prec),
                  BatchAugment(FINETUNE_AUGMENT, source.backbone["image_size"], *_norm(source.config)),
                  train, test, classes,
                  {**source.config, "finetune": {"source": source.path, **stored, "n_labelled": len(train),
                                                 "subset_sha256": digest}},
                  source.backbone, identity, dev, prec, bs,
                  max(1, len(unlabelled) // ub if semi else len(train) // bs), epochs,
                  unlabelled.to(dev) if semi else None, ub, why)


def unlabelled_mode(choice: str, labels: torch.Tensor,
                    duel: Optional[Callable[[], tuple[int, int]]] = None) -> tuple[str, str]:
    """(none | propagate, why) for --unlabelled. auto propagates when the labelled images `labels` hold at
    least AUTO_MIN_PER_CLASS a class on average (over the classes they name: propagation cost 2.8 points at 2
    labels a class on flowers, gained 1.7 on average from 5 to 25; `select`'s picks are uneven, the mean is
    their budget), and below that when `duel()` (held-out labelled images: propagation's wins and losses
    against the labelled images' class means, edgessl.semi.held_out_duel) passes a sign test at AUTO_P:
    features whose neighbours know the classes (docs/benchmarks.md, "Few labels and the unlabelled images")."""
    if choice != AUTO:
        return choice, ""
    mean = len(labels) / len(labels.unique())
    if mean >= AUTO_MIN_PER_CLASS:
        return "propagate", f"auto: {mean:.1f} labels a class on average, at least {AUTO_MIN_PER_CLASS}"
    head = f"auto: {mean:.1f} labels a class on average, fewer than {AUTO_MIN_PER_CLASS}"
    if duel is None:
        return "none", head
    wins, losses = duel()
    if wins + losses == 0:
        return "none", f"{head}; on held-out labels propagation and the class means never disagreed"
    p = sign_test(wins, losses)
    head += f"; on held-out labels propagation beat the class means {wins} to {losses}, p = {p:.3f}"
    return ("propagate", head) if p < AUTO_P else ("none", f"{head}, not below {AUTO_P}")


def pool_duel(encoder: nn.Module, labelled: data_lib.ImageData, pool: data_lib.ImageData, config: dict,
              device: torch.device, precision: str, seed: int) -> tuple[int, int]:
    """edgessl.semi.held_out_duel on the encoder's features of the labelled images and the pool."""
    feats, labels, known = graph_inputs(encoder.to(device), labelled, pool, config, device, precision)
    return held_out_duel(feats, labels, known, int(labels.max()) + 1, seed=seed)


def graph_inputs(net: nn.Module, labelled: data_lib.ImageData, pool: data_lib.ImageData, config: dict,
                 device: torch.device, precision: str) -> tuple:
    """edgessl.semi's inputs: `net`'s features of the labelled images, then of the pool (fp32, on the
    CPU), their labels (the pool's zeros, never read), and the mask of the labelled rows."""
    feats = torch.cat([features(net, d.images, *_norm(config), device, precision).cpu() for d in (labelled, pool)])
    labels = torch.cat([labelled.labels.cpu(), torch.zeros(len(pool), dtype=torch.long)])
    return feats, labels, torch.arange(len(feats)) < len(labelled)


def _norm(config: dict) -> tuple:
    return config["data"]["mean"], config["data"]["std"]


def _train(t: Tuning, out: Path, state: Optional[dict], progress, stop_at_step, log) -> dict:
    metrics = CsvLog(out / "metrics.csv", FIELDS)
    if state is None:
        pos = Position(planned_epochs=None if t.ft.minutes else t.epochs)
        out.mkdir(parents=True, exist_ok=True)
        metrics.create()
    else:
        checkpoint.restore_training(state, t.model, t.optimizer, t.scaler)
        pos = Position.from_state(state["position"])
        metrics.keep(pos.epoch)  # exactly the epochs its checkpoint covers (a kill may have added one)
    done = f" (from epoch {pos.epoch}{f', step {pos.step}' if pos.epoch_step else ''})" if pos.step else ""
    log(f"edgessl finetune: {len(t.train)} labelled images ({t.config['finetune']['n_labelled']} of the train set, "
        f"seed {t.ft.seed}), {len(t.classes)} classes, init {t.ft.init}, {unlabelled_line(t)}, "
        f"{pos.planned_epochs or f'up to {t.epochs}'} epochs{done}, {t.device} {t.precision}")
    show = sys.stderr.isatty() if progress is None else progress
    start = time.perf_counter()
    stopped = loop.run(loop_steps(t, out, metrics, show), pos, lambda step: step == stop_at_step)
    top1 = pos.last_score
    score = ("no test images" if t.test is None else "not tested at this epoch" if top1 is None
             else f"test top-1 {top1:.2f} %")
    log(f"{score} after {pos.epoch} epochs on "
        f"{len(t.train)} labels and {unlabelled_line(t)} ({out}/checkpoint.pt)"
        + (f"\nstopped at step {pos.step}, checkpoint saved: --resume continues the run" if stopped else ""))
    return {"run_dir": str(out), "test_top1": top1, "n_labelled": len(t.train), "epochs": pos.epoch,
            "n_unlabelled": len(t.unlabelled) if t.unlabelled is not None else 0,
            "unlabelled": "label propagation" if t.unlabelled is not None else "none",
            "init": t.ft.init, "seed": t.ft.seed, "seconds": round(time.perf_counter() - start, 2),
            "stopped_early": stopped}


def loop_steps(t: Tuning, out: Path, metrics: CsvLog, show: bool) -> Steps:
    """Fine-tuning's steps, as the loop (edgessl.loop) runs them. Labelled batches only, or with
    unlabelled images a pass over them, each step a labelled batch (drawn at random) beside an
    unlabelled one with its pseudo-labels (propagated from the features at the epoch's start)."""
    sync = loop.sync_every(t.device)

    def begin_epoch(pos: Position) -> None:
        if t.unlabelled is not None:
            labels, weight = propagate_labels(t)
            pos.epoch_state = {"labels": labels, "weight": weight}
        t.model.train()
        n = len(t.train if t.unlabelled is None else t.unlabelled)
        pos.perm = torch.randperm(n, generator=torch.Generator().manual_seed(t.ft.seed * 100_003 + pos.epoch)).to(
            t.device)

    def step(pos: Position, total: int) -> Step:
        set_lr(t.optimizer, lr_at(pos.step, total, min(t.steps_per_epoch, total // 10), t.ft.lr))
        i = pos.epoch_step
        if t.unlabelled is None:
            loss = batch_loss(t, t.train.images, t.train.labels, pos.perm[i * t.batch:(i + 1) * t.batch])
        else:
            loss = semi_loss(t, (pos.epoch_state["labels"], pos.epoch_state["weight"]),
                             torch.randint(0, len(t.train), (t.batch,), device=t.device),
                             pos.perm[i * t.unlabelled_batch:(i + 1) * t.unlabelled_batch])
        skipped = guarded_step(loss, t.optimizer, t.scaler, pos.step, t.device, read=sync == 1)
        return Step(["loss"], loss.detach().float().reshape(1), skipped)

    def end_epoch(pos: Position, sums: dict, step_log: list, images_per_s: float, last: bool) -> None:
        tested = t.test is not None and (pos.epoch % t.test_every == 0 or last)
        top1 = evaluate(t.model, t.test, *_norm(t.config), t.device, t.precision) if tested else None
        pos.last_loss, pos.last_score = sums["loss"] / t.steps_per_epoch, top1
        metrics.append({"epoch": pos.epoch, "step": pos.step, "loss": f"{pos.last_loss:.6f}",
                        "lr_head": f"{t.optimizer.param_groups[-1]['lr']:.6g}", "seconds": f"{pos.elapsed:.2f}",
                        "test_top1": "" if top1 is None else f"{top1:.2f}"})
        save(pos)

    def save(pos: Position, step_log: Optional[list] = None) -> None:
        checkpoint.save({"kind": "classifier", "config": t.config, "classes": t.classes, "backbone": t.backbone,
                         "data": t.identity, "position": pos.state(),
                         **checkpoint.training_state(t.model, t.optimizer, t.scaler)}, out / "checkpoint.pt")

    return Steps(t.steps_per_epoch, step, end_epoch, save, begin_epoch, t.device, sync,
                 t.batch + t.unlabelled_batch, t.ft.minutes * 60 if t.ft.minutes else None, most_epochs=t.epochs,
                 desc="finetune", show=show)


def unlabelled_line(t: Tuning) -> str:
    why = t.unlabelled_why
    if t.unlabelled is None:
        return f"no unlabelled images ({why})" if why else "no unlabelled images"
    how = "; ".join(["pseudo-labelled by label propagation each epoch", *([why] if why else [])])
    return f"{len(t.unlabelled)} unlabelled images ({how})"


def batch_loss(t: Tuning, images, labels, idx, weight=None) -> torch.Tensor:
    """Cross-entropy of the augmented batch `idx` (per image `weight`s: their weighted mean)."""
    with autocast(t.device, t.precision):
        logits = t.model(t.augment(images[idx])).float()
    if weight is None:
        return F.cross_entropy(logits, labels[idx])
    return (F.cross_entropy(logits, labels[idx], reduction="none") * weight[idx]).mean()


def semi_loss(t: Tuning, pseudo: tuple, labelled_idx, unlabelled_idx) -> torch.Tensor:
    labels, weight = pseudo
    return batch_loss(t, t.train.images, t.train.labels, labelled_idx) + UNLABELLED_WEIGHT * batch_loss(
        t, t.unlabelled.images, labels, unlabelled_idx, weight)


@torch.no_grad()
def propagate_labels(t: Tuning) -> tuple:
    """(pseudo-labels, weights) of the unlabelled images: label propagation over the kNN graph of the
    model's features of the labelled and unlabelled images together (edgessl.semi)."""
    feats, labels, labelled = graph_inputs(t.model.backbone, t.train, t.unlabelled, t.config, t.device, t.precision)
    pseudo, weight, _ = propagate(feats, labels, labelled, len(t.classes))
    n = len(t.train)
    return pseudo[n:].to(t.device), weight[n:].to(t.device)


def unlabelled_pool(ft: FinetuneConfig, src: dict, train: data_lib.ImageData,
                    subset: torch.Tensor) -> Optional[data_lib.ImageData]:
    """The images that train without their labels (their labels stripped here, never read): with the
    run's own split, its training images beyond the labelled subset; with --train, the pretraining
    run's own training images."""
    if ft.train:
        pool, _ = data_lib.load_split(run_config({"config": src}).data)
    else:
        rest = torch.ones(len(train), dtype=torch.bool)
        rest[subset] = False
        pool = train.subset(rest.nonzero().flatten())
    if len(pool) == 0:
        return None
    return data_lib.ImageData(pool.images, None, [], pool.spec, files=pool.files)


def labelled_sets(ft: FinetuneConfig, src: dict, size: int) -> tuple[data_lib.ImageData, Optional[data_lib.ImageData]]:
    """--train and --test, or with neither the source run's own split: its training images
    (labels from the data, or from --labels) and its held-out images as the test set (with
    --labels there may be none: the classifier is then trained untested)."""
    if bool(ft.train) != bool(ft.test) and not ft.labels:
        raise EdgesslError("give both --train and --test, or neither (the pretraining run's own split)")
    cfg = run_config({"config": src}).data
    own_train, own_test = (None, None) if ft.train else data_lib.load_split(cfg)
    train = data_lib.load(ft.train, size, fit=cfg.fit) if ft.train else own_train
    test = data_lib.load(ft.test, size, fit=cfg.fit) if ft.test else own_test
    if ft.labels and not ft.test and test is not None and test.labels is None:
        test = None  # the run's held-out images carry no labels: nothing to test on
    if test is None and not ft.labels:
        raise EdgesslError("the pretraining run holds out no images (data.val_fraction / val_spec): "
                           "give --train and --test")
    if test is not None and test.labels is None:
        raise EdgesslError(f"fine-tuning tests on labelled images: {test.spec} has no labels")
    if train.labels is None and not ft.labels:
        raise EdgesslError(f"{train.spec} has no labels: give --labels labels.csv (`edgessl select` helps make it)")
    return train, test


def user_labels(ft: FinetuneConfig, src: dict, train: data_lib.ImageData,
                test: Optional[data_lib.ImageData]) -> tuple[data_lib.ImageData, torch.Tensor]:
    """(train with labels.csv's labels on its rows, those rows sorted): each path is resolved against
    the training images' folder; the classes are the test set's (every label one of them), or with
    no test set the labels' own names, sorted."""
    from edgessl.selection import names_of, read_paths, rows_of

    rows = read_paths(ft.labels, "--labels", label=True)
    if not rows:
        raise EdgesslError(f"--labels {ft.labels}: no labelled rows")
    root = data_lib.folder_root(ft.train or run_config({"config": src}).data.spec)
    index = rows_of([p for p, _ in rows], names_of(train), root, f"--labels {ft.labels}")
    given: dict[int, str] = {}
    for i, (path, label) in zip(index, rows):
        if given.setdefault(i, label) != label:
            raise EdgesslError(f"--labels {ft.labels}: {path!r} is labelled both {given[i]!r} and {label!r}")
    classes = list(test.classes) if test is not None else sorted(set(given.values()))
    unknown = sorted(set(given.values()) - set(classes))
    if unknown:
        raise EdgesslError(f"--labels {ft.labels}: {', '.join(map(repr, unknown))} not among the test set's classes "
                           f"({', '.join(classes)})")
    labels = torch.full((len(train),), -1, dtype=torch.long)
    for i, label in given.items():
        labels[i] = classes.index(label)
    subset = torch.tensor(sorted(given))
    return dataclasses.replace(train, labels=labels, classes=classes), subset


def _resume_state(out: Path) -> dict:
    state = checkpoint.load(out / "checkpoint.pt")
    if not is_classifier(state) or "optimizer" not in state:
        raise EdgesslError(f"{out}/checkpoint.pt is not a fine-tuning checkpoint that can be resumed")
    return state


def _digest(index: torch.Tensor, labels: Optional[torch.Tensor] = None) -> str:
    """The labelled subset's identity: its rows, and with --labels their labels too (the data's own
    labels are checked with the data's identity; a run from before --labels keeps its digest)."""
    rows = index if labels is None else torch.stack([index, labels.cpu()[index]])
    return hashlib.sha256(rows.numpy().astype("int64").tobytes()).hexdigest()[:16]


@torch.no_grad()
def evaluate(model: nn.Module, data, mean, std, device, precision) -> float:
    """Test top-1 (%) of a classifier on uint8 images, eval mode."""
    logits = features(model, data.images, mean, std, device, precision)
    return 100.0 * (logits.argmax(1) == data.labels.to(logits.device)).sum().item() / len(data)
