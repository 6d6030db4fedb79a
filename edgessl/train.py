"""Pretraining: data -> augment -> backbone -> method (loss + bank) -> optimizer -> checkpoint.

`pretrain(cfg, run_dir)` is the library entry point the CLI calls. The loop is short
on purpose (nanoGPT): everything it needs is built first (and every input checked
before anything is written), then steps run until the epoch or minute budget ends.
"""
from __future__ import annotations

import csv
import inspect
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from edgessl import checkpoint, data as data_lib, distributed
from edgessl.augment import BatchAugment, normalize
from edgessl.backbones import create_backbone, resolve_name
from edgessl.config import Config, dump_yaml, from_dict, to_dict
from edgessl.errors import EdgesslError
from edgessl.knn import knn_accuracy
from edgessl.methods import METHODS

METRIC_FIELDS = ["epoch", "step", "loss", "loss_id", "loss_sqrtkl", "lr", "seconds", "images_per_s",
                 "peak_mem_mb", "knn_top1"]
BUDGET_KEYS = {("optim", "minutes"), ("data", "storage")}  # what --resume may change: a budget and where images live
PLAN_AFTER_STEPS = 10  # with a minute budget and no epoch count, the schedule is planned after this


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when torch sees it (under torchrun, the process's LOCAL_RANK device), else CPU."""
    if name == "auto" or name == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.local_rank())
        if name == "auto":
            return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EdgesslError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EdgesslError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 (or fp16 without bf16) on CUDA; fp32 on CPU, where bf16 autocast ran 2.4x
    slower than fp32 on this AVX-512-without-AMX machine (MEASURED.md; scripts/bench_precision.py)."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise EdgesslError("precision fp16 needs a CUDA device (GradScaler); use bf16 or fp32 on CPU")
    return precision


def autocast(device: torch.device, precision: str):
    """Mixed precision for the network; the bank, logits and losses are cast to fp32 in the method."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up then cosine decay to zero: a pure function of the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def peak_mem_mb(device: torch.device) -> float:
    """CUDA: peak allocated tensor memory. CPU: the process's peak resident set (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Setup:
    cfg: Config
    device: torch.device
    precision: str
    train: data_lib.ImageData
    val: Optional[data_lib.ImageData]
    image_size: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    augment: BatchAugment
    steps_per_epoch: int
    rank: int = 0  # torchrun: this process's rank among `world`; only rank 0 writes files
    world: int = 1
    forward: Optional[torch.nn.Module] = None  # the model, or its DistributedDataParallel wrapper


def load_data(cfg: Config) -> tuple[data_lib.ImageData, Optional[data_lib.ImageData]]:
    if not cfg.data.spec:
        raise EdgesslError("no training data: give a dataset spec (--data npz:PATH, folder:DIR, ...)")
    train = data_lib.load(cfg.data.spec, cfg.data.image_size, cfg.data.bad_images, cfg.data.storage)
    val = None
    if cfg.data.val_spec:
        val = data_lib.load(cfg.data.val_spec, train.images.shape[-1], cfg.data.bad_images, cfg.data.storage)
    elif cfg.data.val_fraction > 0:
        train, val = data_lib.split(train, cfg.data.val_fraction, cfg.data.split_seed)
    n = cfg.data.train_subset
    if n is not None:
        if not 1 <= n <= len(train):
            raise EdgesslError(f"data.train_subset {n} is not between 1 and the {len(train)} training images")
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(
            cfg.data.split_seed))[:n].sort().values)
    return train, val


def build(cfg: Config) -> Setup:
    """Everything a run needs, checked before anything is written."""
    device = resolve_device(cfg.run.device)
    precision = resolve_precision(cfg.run.precision, device)
    rank, world = distributed.init(device.type)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    resolve_name(cfg.backbone.name)  # a typo fails before the data is decoded
    train, val = load_data(cfg)
    if cfg.optim.batch_size * world > len(train):
        raise EdgesslError(f"batch size {cfg.optim.batch_size}{f' x {world} processes' if world > 1 else ''} is "
                           f"larger than the {len(train)} training images")
    size = train.images.shape[-1]
    b = cfg.backbone
    backbone = create_backbone(b.name, size, b.downsample, b.init_weights)
    model = METHODS[cfg.method.name](backbone, len(train), cfg.method, **method_args(cfg, train)).to(device)
    forward = model
    if cfg.run.sync_bn and world > 1:
        if device.type != "cuda":
            raise EdgesslError("run.sync_bn needs CUDA devices: torch's SyncBatchNorm has no CPU kernel")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        forward = model
    if world > 1:  # gradients averaged over ranks; the bank is kept equal by the method's own collectives
        from torch.nn.parallel import DistributedDataParallel

        # BatchNorm statistics stay per rank in the forward pass; torch >= 2.13 names that
        # forward_sync_buffers (broadcast_buffers is deprecated there and warns)
        no_forward_sync = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          **no_forward_sync)
        torch.manual_seed(cfg.run.seed + 1000 * rank)  # each rank its own augmentations
    return Setup(cfg, device, precision, train.to(device), val.to(device) if val is not None else None, size,
                 model, make_optimizer(cfg, model), torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                 BatchAugment(cfg.augment, size, cfg.data.mean, cfg.data.std, cfg.run.augment_threads),
                 len(train) // (cfg.optim.batch_size * world), rank, world, forward)


def method_args(cfg: Config, train: data_lib.ImageData) -> dict:
    """Extra constructor arguments: the class count, for methods that train on labels."""
    if not getattr(METHODS[cfg.method.name], "needs_labels", False):
        return {}
    if train.labels is None:
        raise EdgesslError(f"--method {cfg.method.name} needs labelled training data")
    return {"num_classes": len(train.classes)}


def make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD (released recipe) or AdamW; no weight decay on biases and norm weights."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.optim.lr)
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)


@torch.no_grad()
def extract_features(backbone, images: torch.Tensor, mean, std, batch_size: int, device, precision) -> torch.Tensor:
    """Pooled backbone features h (not z) of uint8 images, eval mode: (N, D) fp32."""
    was_training = backbone.training
    backbone.eval()
    feats = []
    for chunk in images.split(batch_size):
        with autocast(device, precision):
            feats.append(backbone(normalize(chunk.to(device), mean, std)).float())
    backbone.train(was_training)
    return torch.cat(feats)


def monitor(s: Setup) -> Optional[float]:
    """kNN top-1 (%) of the backbone on the held-out split, train split as memory (rank 0)."""
    if s.rank != 0 or s.val is None or s.train.labels is None or s.val.labels is None:
        return None
    c = s.cfg
    f = [extract_features(s.model.backbone, d.images, c.data.mean, c.data.std, 256, s.device, s.precision)
         for d in (s.train, s.val)]
    return knn_accuracy(f[0], s.train.labels, f[1], s.val.labels, len(s.train.classes), c.run.knn_k)


def pixels_knn(s: Setup) -> Optional[float]:
    """The floor a run must beat: kNN on raw pixels centred by the train mean (rank 0)."""
    if s.rank != 0 or s.val is None or s.train.labels is None or s.val.labels is None or s.train.mapped:
        return None  # (a memory-mapped set is not flattened into RAM for this)
    tr, va = (d.images.flatten(1).float() for d in (s.train, s.val))
    mu = tr.mean(0)
    return knn_accuracy(tr - mu, s.train.labels, va - mu, s.val.labels, len(s.train.classes), s.cfg.run.knn_k)


def calibrate(s: Setup) -> None:
    """Bank init pass over every training image, in balanced chunks (no batch of one for BatchNorm)."""
    c = s.cfg
    chunks = torch.arange(len(s.train), device=s.device).tensor_split(math.ceil(len(s.train) / c.optim.batch_size))
    chunks = chunks[s.rank::s.world]  # each rank its share; the method gathers the rows

    def batches():
        for idx in chunks:
            imgs = s.train.images[idx]
            x = s.augment(imgs) if c.method.bank_init_augment else normalize(imgs, c.data.mean, c.data.std)
            yield x, idx

    with autocast(s.device, s.precision):
        s.model.calibrate_bank(batches())


class RunFiles:
    """metrics.csv (per epoch), steps.csv (per step), config.yaml, checkpoint.pt in one folder."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.dir, self.enabled = run_dir, enabled  # enabled: rank 0 writes, the other ranks do not
        self.metrics, self.steps, self.ckpt = run_dir / "metrics.csv", run_dir / "steps.csv", run_dir / "checkpoint.pt"

    def start(self, cfg: Config, resume: Optional[dict] = None, skipped: tuple = ()) -> None:
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(dump_yaml(cfg))
        if skipped:  # --bad-images skip: what was left out, and why
            (self.dir / "bad_images.txt").write_text("".join(f"{f}\t{why}\n" for f, why in skipped))
        if resume is None:
            _write_csv(self.metrics, METRIC_FIELDS, [])
            _write_csv(self.steps, ["step", "loss"], [])
            return
        # Keep exactly what the checkpoint covers: rows were written before the checkpoint that
        # follows them, so anything past these counts (even a line cut by a kill) is dropped.
        for path, keep in ((self.metrics, resume["epoch"] + 1), (self.steps, resume["step"])):
            header, rows = _read_csv(path)
            if len(rows) < keep:
                raise EdgesslError(f"{path} has {len(rows)} rows, fewer than the checkpoint's {keep}")
            _write_csv(path, header, rows[:keep])

    def add_metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics, "a", newline="") as f:
            csv.DictWriter(f, METRIC_FIELDS).writerow({k: row.get(k, "") for k in METRIC_FIELDS})

    def add_steps(self, rows: list[tuple[int, float]]) -> None:
        if not self.enabled:
            return
        with open(self.steps, "a") as f:
            f.writelines(f"{step},{loss!r}\n" for step, loss in rows)


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    if not path.exists():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, header or METRIC_FIELDS)
        w.writeheader()
        w.writerows(rows)


def check_run_dir(run_dir: Path, resume: bool) -> None:
    ckpt = run_dir / "checkpoint.pt"
    if resume and not ckpt.exists():
        raise EdgesslError(f"--resume: no checkpoint in {run_dir}")
    if not resume and ckpt.exists():
        raise EdgesslError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    parent = run_dir if run_dir.exists() else next(p for p in run_dir.absolute().parents if p.exists())
    if not os.access(parent, os.W_OK):
        raise EdgesslError(f"cannot write to {parent}")
    if shutil.disk_usage(parent).free < 200 * 2**20:
        raise EdgesslError(f"less than 200 MB free under {parent}")


def resume_config(cfg: Config, state: dict) -> None:
    """--resume continues the stored recipe; only the minute budget (and data.storage) may change."""
    stored, given = state["config"], to_dict(cfg)
    diff = [f"{s}.{k}" for s in stored for k in stored[s]
            if (s, k) not in BUDGET_KEYS and stored[s][k] != given[s][k]]
    if diff:
        raise EdgesslError(f"--resume continues the stored run; these settings differ from it: {', '.join(diff)}")


def pretrain(cfg: Config, run_dir: str | Path, resume: bool = False, progress: Optional[bool] = None,
             stop_at_step: Optional[int] = None, log: Callable[[str], None] = print,
             keep: Optional[dict] = None) -> dict:
    """Train (or continue) a run; return its summary. `stop_at_step` checkpoints and stops there
    (what a preemption does; the resume test uses it); `keep["setup"]` receives the trained
    Setup (model, data, rank) for callers that inspect it."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, resume)
    state = checkpoint.load(run_dir / "checkpoint.pt") if resume else None
    if state is not None:
        resume_config(cfg, state)
    s = build(cfg)
    if keep is not None:
        keep["setup"] = s
    files = RunFiles(run_dir, enabled=s.rank == 0)
    if state is None:
        baselines = {"knn_pixels": pixels_knn(s), "knn_untrained": monitor(s)}
        start = time.perf_counter()
        if cfg.method.bank_init == "calibrated" and hasattr(s.model, "calibrate_bank"):
            calibrate(s)
        calib_s = time.perf_counter() - start
        pos = {"epoch": 0, "step": 0, "epoch_step": 0, "elapsed": calib_s, "calib_s": calib_s,
               "perm": None, "sums": {}, "baselines": baselines}
        files.start(cfg, skipped=s.train.skipped)
        files.add_metrics({"epoch": 0, "step": 0, "seconds": f"{pos['elapsed']:.2f}",
                           "knn_top1": _fmt(baselines["knn_untrained"])})
    else:
        pos = restore(s, state)
        if s.world > 1:  # the checkpoint holds rank 0's RNG: each rank continues its own stream
            torch.manual_seed(cfg.run.seed + 1000 * s.rank + pos["step"])
        files.start(cfg, pos, s.train.skipped)
    if s.rank != 0:
        log = _quiet
    log(f"edgessl pretrain: {data_lib.describe(s.train)} | {s.model.backbone.timm_name} "
        f"(output stride {s.model.backbone.output_stride}, {s.model.backbone.feature_dim}-d) | "
        f"{cfg.method.name} | {s.device} {s.precision}"
        + (f" | {s.world} processes x batch {cfg.optim.batch_size}" if s.world > 1 else ""))
    with stop_signals() as signalled:
        try:
            return train_loop(s, files, pos, progress, lambda step: step == stop_at_step or bool(signalled), log)
        except RuntimeError as e:
            if s.world == 1:
                raise
            # a collective failed: another rank died or stopped answering (gloo / nccl / timeout)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EdgesslError(f"rank {s.rank} of {s.world}: a collective failed, another process probably died "
                               f"({first[:300]}); the last checkpoint is kept, --resume continues") from e


@contextmanager
def stop_signals():
    """SIGINT / SIGTERM during training: finish the step, checkpoint, stop (the list fills up)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, lambda num, frame: received.append(num))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def restore(s: Setup, state: dict) -> dict:
    s.model.load_state_dict(state["model"], strict=True)
    s.optimizer.load_state_dict(state["optimizer"])
    s.scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"])
    return dict(state["position"])


def _quiet(*_) -> None:
    pass


def save(s: Setup, files: RunFiles, pos: dict) -> None:
    if not files.enabled:
        return
    checkpoint.save({"config": to_dict(s.cfg), "position": pos, "model": s.model.state_dict(),
                     "method_args": {"num_samples": len(s.train), **method_args(s.cfg, s.train)},
                     "optimizer": s.optimizer.state_dict(), "scaler": s.scaler.state_dict(),
                     "rng": checkpoint.rng_state(), "backbone": {
                         "timm_name": s.model.backbone.timm_name, "model_args": s.model.backbone.model_args,
                         "output_stride": s.model.backbone.output_stride,
                         "feature_dim": s.model.backbone.feature_dim, "image_size": s.image_size}}, files.ckpt)


def _fmt(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}"


def train_loop(s: Setup, files: RunFiles, pos: dict, progress, stop: Callable[[int], bool], log) -> dict:
    from tqdm import tqdm

    c, n, bs = s.cfg, len(s.train), s.cfg.optim.batch_size
    first = s.rank * bs  # this rank's slice of each global batch of bs x world images
    warmup = int(c.optim.warmup_epochs * s.steps_per_epoch)
    budget = c.optim.minutes * 60 if c.optim.minutes else None
    pos.setdefault("planned_epochs", c.optim.epochs)
    show = (sys.stderr.isatty() if progress is None else progress) and s.rank == 0
    s.model.train()
    # a budget ends at the first epoch boundary after it, so at least one epoch always runs
    while (pos["planned_epochs"] is None or pos["epoch"] < pos["planned_epochs"]) and not (
            budget and distributed.any_rank(pos["elapsed"] >= budget, s.device) and pos["epoch_step"] == 0
            and pos["epoch"] > 0):
        if pos["perm"] is None:  # seeded by (seed, epoch): the same order on every rank
            pos["perm"] = torch.randperm(n, generator=torch.Generator().manual_seed(c.run.seed * 100_003 + pos["epoch"]))
        t0, t_epoch, done, step_log = time.perf_counter(), time.perf_counter(), 0, []
        bar = tqdm(total=s.steps_per_epoch, initial=pos["epoch_step"], disable=not show, leave=False,
                   desc=f"epoch {pos['epoch'] + 1}/{pos['planned_epochs'] or '?'}", file=sys.stderr)
        while pos["epoch_step"] < s.steps_per_epoch:
            if pos["planned_epochs"] is None and pos["step"] == PLAN_AFTER_STEPS:
                pos["planned_epochs"] = int(distributed.from_rank0(plan_epochs(
                    budget - pos["calib_s"], pos["elapsed"] - pos["calib_s"] + time.perf_counter() - t0,
                    pos["step"], s.steps_per_epoch), s.device))
                pos["plan_at"] = [pos["step"], pos["elapsed"] + time.perf_counter() - t0]
            total = (pos["planned_epochs"] or 10**9) * s.steps_per_epoch
            start = pos["epoch_step"] * bs * s.world + first
            idx = pos["perm"][start:start + bs].to(s.device)
            out = train_step(s, idx, lr_at(pos["step"], total, warmup, c.optim.lr), pos["step"], total)
            loss = out["loss"].item()
            for k, v in [("loss", loss)] + [(k, v.item()) for k, v in out["parts"].items()]:
                pos["sums"][k] = pos["sums"].get(k, 0.0) + v
            step_log.append((pos["step"], loss))
            pos["skipped_steps"] = pos.get("skipped_steps", 0) + int(out["skipped"])
            pos["step"] += 1
            pos["epoch_step"] += 1
            done += 1
            bar.update()
            bar.set_postfix(loss=f"{loss:.3f}")
            every, minutes = c.run.checkpoint_every_steps, c.run.checkpoint_every_minutes
            stopping = distributed.any_rank(stop(pos["step"]), s.device) if s.world > 1 else stop(pos["step"])
            due = every and pos["step"] % every == 0 or minutes and time.perf_counter() - t0 >= minutes * 60
            if pos["epoch_step"] < s.steps_per_epoch and (stopping or due):
                pos["elapsed"] += time.perf_counter() - t0
                files.add_steps(step_log)
                save(s, files, pos)
                t0, step_log = time.perf_counter(), []
                if stopping:
                    bar.close()
                    return summary(s, files, pos, log, stopped=True)
        bar.close()
        pos["elapsed"] += time.perf_counter() - t0
        plan_step, plan_s = pos.get("plan_at") or (None, None)
        if budget and plan_step is not None and pos["step"] - plan_step >= PLAN_AFTER_STEPS:
            # the first steps run slower (allocations, kernel selection): re-fit the cosine to the
            # speed of the steps since the plan, so a run fills its budget instead of ending early
            step_s = (pos["elapsed"] - plan_s) / (pos["step"] - plan_step)
            pos["planned_epochs"] = int(distributed.from_rank0(replan_epochs(
                budget, pos["elapsed"], step_s, pos["epoch"] + 1, s.steps_per_epoch), s.device))
        last = pos["epoch"] + 1 == pos["planned_epochs"] or bool(
            budget and distributed.any_rank(pos["elapsed"] >= budget, s.device))
        end_epoch(s, files, pos, s.optimizer.param_groups[0]["lr"], step_log,
                  done * bs / max(time.perf_counter() - t_epoch, 1e-9), last)
        if distributed.any_rank(stop(pos["step"]), s.device) if s.world > 1 else stop(pos["step"]):
            return summary(s, files, pos, log, stopped=True)
    return summary(s, files, pos, log)


def plan_epochs(budget_s: float, elapsed_s: float, steps: int, steps_per_epoch: int) -> int:
    """Epochs that fill a minute budget, from the speed of the first steps (the cosine ends there)."""
    return max(1, math.ceil(budget_s / (elapsed_s / steps * steps_per_epoch)))


def replan_epochs(budget_s: float, elapsed_s: float, step_s: float, epochs_done: int, steps_per_epoch: int) -> int:
    """At an epoch end: the epochs done plus those that fit in what is left of the budget at
    step_s seconds a step (the last one ends past the budget, as the first plan's does)."""
    left = budget_s - elapsed_s
    return epochs_done if left <= 0 else epochs_done + math.ceil(left / (step_s * steps_per_epoch))


def train_step(s: Setup, idx: torch.Tensor, lr: float, step: int, total: int = 1) -> dict:
    for g in s.optimizer.param_groups:
        g["lr"] = lr
    raw = s.train.images[idx]
    images = torch.cat([s.augment(raw) for _ in range(s.model.num_views)])  # (views * B, 3, S, S)
    labels = s.train.labels[idx] if s.train.labels is not None else None
    with autocast(s.device, s.precision):
        out = (s.forward or s.model)(images, idx, labels)
    if distributed.any_rank(not bool(torch.isfinite(out["loss"])), s.device):
        raise EdgesslError(f"loss is {out['loss'].item()} at step {step}"
                           f"{f' on rank {s.rank} or another' if s.world > 1 else ''}: stopped before the weights "
                           "or the bank took it in; the last checkpoint is kept")
    s.optimizer.zero_grad(set_to_none=True)
    s.scaler.scale(out["loss"]).backward()
    scale = s.scaler.get_scale() if s.scaler.is_enabled() else 1.0
    s.scaler.step(s.optimizer)
    s.scaler.update()
    # fp16: a lowered scale means inf/NaN gradients and a skipped optimizer step (not fatal, counted)
    out["skipped"] = s.scaler.is_enabled() and s.scaler.get_scale() < scale
    s.model.update(out, min(1.0, (step + 1) / total))
    return out


def end_epoch(s: Setup, files: RunFiles, pos: dict, lr: float, step_log: list, images_per_s: float,
              last: bool) -> None:
    c, steps = s.cfg, s.steps_per_epoch
    pos["epoch"] += 1
    knn = monitor(s) if c.run.monitor_every and (pos["epoch"] % c.run.monitor_every == 0 or last) else None
    sums = pos["sums"]
    files.add_steps(step_log)
    files.add_metrics({"epoch": pos["epoch"], "step": pos["step"], "lr": f"{lr:.6g}",
                       **{k: f"{v / steps:.6f}" for k, v in sums.items()},
                       "seconds": f"{pos['elapsed']:.2f}", "images_per_s": f"{images_per_s:.1f}",
                       "peak_mem_mb": f"{peak_mem_mb(s.device):.0f}", "knn_top1": _fmt(knn)})
    pos.update(perm=None, epoch_step=0, sums={}, last_loss=sums.get("loss", 0.0) / steps, last_knn=knn)
    save(s, files, pos)


def summary(s: Setup, files: RunFiles, pos: dict, log, stopped: bool = False) -> dict:
    c = s.cfg
    images = pos["step"] * c.optim.batch_size * s.world
    out = {"run_dir": str(files.dir), "method": c.method.name, "backbone": s.model.backbone.timm_name,
           "device": str(s.device), "precision": s.precision, "epochs": pos["epoch"], "steps": pos["step"],
           "seconds": round(pos["elapsed"], 2), "images_per_s": round(images / max(pos["elapsed"], 1e-9), 1),
           "peak_mem_mb": round(peak_mem_mb(s.device)), "final_loss": pos.get("last_loss"),
           "knn_top1": pos.get("last_knn"), **pos["baselines"], "stopped_early": stopped,
           "skipped_steps": pos.get("skipped_steps", 0)}
    lines = [f"run        {out['run_dir']}",
             f"trained    {out['epochs']} epochs, {out['steps']} steps in {out['seconds']:.0f} s "
             f"({out['images_per_s']:.0f} images/s, peak memory {out['peak_mem_mb']} MB)",
             f"loss       {out['final_loss']:.4f}" if out["final_loss"] is not None else "loss       -"]
    if out["knn_pixels"] is not None:
        lines.append(f"kNN top-1  {_fmt(out['knn_top1']) or '-'} % trained | {_fmt(out['knn_untrained'])} % untrained "
                     f"network | {_fmt(out['knn_pixels'])} % raw pixels  (k={c.run.knn_k}, held-out "
                     f"{len(s.val)} images)")
    lines.append(f"files      {files.dir}/{{config.yaml, metrics.csv, steps.csv, checkpoint.pt}}")
    if stopped:
        lines.append(f"stopped    at step {pos['step']}, checkpoint saved: --resume continues the run")
    log("\n".join(lines))
    return out


def config_from_checkpoint(run_dir: str | Path) -> Config:
    """The stored config of a run (what --resume starts from)."""
    return from_dict(checkpoint.load(Path(run_dir) / "checkpoint.pt")["config"])
