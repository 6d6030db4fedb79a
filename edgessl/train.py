"""Pretraining: data -> augment -> backbone -> method (loss + bank) -> optimizer -> checkpoint.

`pretrain(cfg, run_dir)` is the library entry point the CLI calls. Everything a run needs is
built first (and every input checked before anything is written); then the one training loop
(edgessl.loop, shared with fine-tuning and the int8 student) runs its steps until the epoch or
minute budget ends.
"""
from __future__ import annotations

import inspect
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from edgessl import capture, checkpoint, data as data_lib, distributed, loop, recipe
from edgessl.augment import BatchAugment, normalize
from edgessl.backbones import create_backbone, resolve_name
from edgessl.config import AUTO, Config, auto_settings, dump_yaml, from_dict, to_dict
from edgessl.depthwise import fast_depthwise
from edgessl.features import features
from edgessl.device import autocast, grad_scaler, peak_mem_mb, precision_why, resolve_device, resolve_precision
from edgessl.errors import EdgesslError
from edgessl.knn import heldout_knn, pixels_margin
from edgessl.methods import create_method, loss_parts, method_class
from edgessl.optim import guarded_step, make_optimizer, param_groups, set_lr
from edgessl.runfiles import RunFiles, check_run_dir, run_lock
from edgessl.rebuild import check_run_data, data_record
from edgessl.loop import Position, Step, Steps
from edgessl.schedule import lr_at, size_at

# what --resume may change: the budget, where images live, whether a report is written, how the step is computed
# (compilation, the depthwise kernel, the fused optimizer: float rounding only; a CUDA graph: that and the jitter's
# recorded order) and how often the loss is read
BUDGET_KEYS = {("optim", "minutes"), ("data", "storage"), ("run", "report"), ("run", "compile"), ("run", "sync_every"),
               ("run", "fast_depthwise"), ("optim", "fused"), ("run", "capture")}


def metric_fields(method: str) -> list[str]:
    """metrics.csv columns: the trainer's, with the method's own loss parts after `loss`."""
    return ["epoch", "step", "loss", *loss_parts(method), "lr", "seconds", "images_per_s", "peak_mem_mb",
            "knn_top1"]


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
    data_identity: dict = field(default_factory=dict)  # {"train", "val"}: what the checkpoint records of the images
    choices: list = field(default_factory=list)  # what the recipe picked from the data (recipe.Choice)
    sync_every: int = 1  # steps between reads of the loss from the device (run.sync_every)
    captured: Optional[capture.StaticStep] = None  # run.capture: the step as one CUDA graph
    capture_note: str = ""  # why run.capture on steps eagerly here


def build(cfg: Config, decide: bool = True) -> Setup:
    """Everything a run needs, checked before anything is written. With `decide` (a new run,
    not a resumed one) the recipe's `auto` values are picked from the data, in place in cfg."""
    device = resolve_device(cfg.run.device)
    precision = resolve_precision(cfg.run.precision, device)
    rank, world = distributed.init(device.type)
    seed_everything(cfg)
    resolve_name(cfg.backbone.name)  # a typo fails before the data is decoded
    if decide:  # stored absolute: the run reads the same images from any working directory
        cfg.data.spec, cfg.data.val_spec = data_lib.absolute(cfg.data.spec), data_lib.absolute(cfg.data.val_spec)
    choices, train, val = recipe.resolve(cfg, device, world, decide)
    if cfg.optim.batch_size * world > len(train):
        raise EdgesslError(f"batch size {cfg.optim.batch_size}{f' x {world} processes' if world > 1 else ''} is "
                           f"larger than the {len(train)} training images")
    size = train.images.shape[-1]
    model = build_model(cfg, train, size, device, world)
    forward = model
    if world > 1:
        forward = data_parallel(model, device)
        torch.manual_seed(cfg.run.seed + 1000 * rank)  # each rank its own augmentations
    if cfg.run.compile is True:
        compile_backbone(model, device, dynamic=cfg.augment.start_size is not None)
    note = capture.why_not(cfg, device, precision, world, train.mapped) if cfg.run.capture is True else None
    graph = cfg.run.capture is True and note is None
    s = Setup(cfg=cfg, device=device, precision=precision, train=train.to(device),
              val=val.to(device) if val is not None else None, image_size=size, model=model,
              optimizer=pretraining_optimizer(cfg, model, capturable=graph), scaler=grad_scaler(device, precision),
              augment=BatchAugment(cfg.augment, size, cfg.data.mean, cfg.data.std,
                                   0 if cfg.run.augment_threads == AUTO else cfg.run.augment_threads),
              steps_per_epoch=len(train) // (cfg.optim.batch_size * world), rank=rank, world=world,
              forward=forward, data_identity=data_record(train, val), choices=choices,
              sync_every=loop.sync_every(device) if cfg.run.sync_every == AUTO else cfg.run.sync_every,
              capture_note=f"capture    off: {note}; eager steps" if note else "")
    if graph:
        s.captured = capture.StaticStep(lambda idx, progress: graph_step(s, idx, progress), s.optimizer,
                                        cfg.optim.batch_size, device)
    return s


def seed_everything(cfg: Config) -> None:
    if cfg.run.threads != AUTO:  # (auto: torch's default)
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)  # unused by edgessl, but in every checkpoint: same seed, same state
    random.seed(cfg.run.seed)


def build_model(cfg: Config, train: data_lib.ImageData, size: int, device: torch.device, world: int):
    """The method module around the run's backbone, on the device (SyncBatchNorm under torchrun on CUDA)."""
    b = cfg.backbone
    backbone = create_backbone(b.name, size, b.downsample, b.init_weights)
    if cfg.run.fast_depthwise and device.type == "cpu":
        fast_depthwise(backbone)
    model = create_method(cfg.method.name, backbone, len(train), cfg.method, **method_args(cfg, train)).to(device)
    if cfg.run.sync_bn and world > 1:
        if device.type != "cuda":
            raise EdgesslError("run.sync_bn needs CUDA devices: torch's SyncBatchNorm has no CPU kernel")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel: gradients averaged over ranks (the bank is kept equal by the method's own
    collectives); BatchNorm statistics stay per rank in the forward pass (torch >= 2.13 names that
    forward_sync_buffers; broadcast_buffers is deprecated there and warns)."""
    from torch.nn.parallel import DistributedDataParallel

    no_forward_sync = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                       else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **no_forward_sync)


def compile_backbone(model: torch.nn.Module, device: torch.device, dynamic: bool) -> None:
    """torch.compile the backbone alone, in place (the same state-dict keys): the bank step breaks graphs."""
    import torch._dynamo as dynamo

    dynamo.config.suppress_errors = True  # a graph inductor cannot build runs eager (with a warning)
    if device.type == "cpu":  # inductor's C++ build looks for CUDA headers and says so when it finds no GPU
        logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaNote())
    model.backbone.compile(dynamic=dynamic)


class _NoCudaNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


def method_args(cfg: Config, train: data_lib.ImageData) -> dict:
    """Extra constructor arguments: the class count, for methods that train on labels."""
    if not getattr(method_class(cfg.method.name), "needs_labels", False):
        return {}
    if train.labels is None:
        raise EdgesslError(f"--method {cfg.method.name} needs labelled training data")
    return {"num_classes": len(train.classes)}


def pretraining_optimizer(cfg: Config, model: torch.nn.Module, capturable: bool = False) -> torch.optim.Optimizer:
    """optim.name (SGD, the released recipe, or AdamW) over the whole method module."""
    o = cfg.optim
    return make_optimizer(param_groups(model, o.weight_decay), o.name, o.lr, o.momentum, fused=o.fused,
                          capturable=capturable)


def eager():
    """A context in which a compiled backbone (run.compile) runs eager: the passes outside the
    training step (bank calibration, kNN monitor) would each compile graphs of their own (eval
    mode, no grad, other batch sizes), each costing far more than their few seconds of work."""
    return torch.compiler.set_stance("force_eager")


def monitor(s: Setup) -> Optional[float]:
    """kNN top-1 (%) of the backbone on the held-out split, train split as memory (rank 0)."""
    if s.rank != 0:
        return None
    c = s.cfg
    return heldout_knn(lambda x: features(s.model.backbone, x, c.data.mean, c.data.std, s.device, s.precision),
                       s.train, s.val, c.run.knn_k)


def pixels_knn(s: Setup) -> Optional[float]:
    """The floor a run must beat: kNN on raw pixels centred by the train mean (rank 0; a
    memory-mapped set is not flattened into RAM for this)."""
    if s.rank != 0 or s.train.mapped:
        return None
    return heldout_knn(lambda x: x.flatten(1), s.train, s.val, s.cfg.run.knn_k, center=True)


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

    with autocast(s.device, s.precision), eager():
        s.model.calibrate_bank(batches())


def resume_config(cfg: Config, state: dict) -> None:
    """--resume continues the stored recipe; only the BUDGET_KEYS may change.
    A value left to the recipe (auto) continues as the stored run picked it."""
    stored = state["config"]
    for key in auto_settings():
        section, name = key.split(".")
        if recipe.is_auto(key, getattr(getattr(cfg, section), name)) and name in stored.get(section, {}):
            from_dict({section: {name: stored[section][name]}}, cfg)
    given = to_dict(cfg)
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
    s = build(cfg, decide=state is None)
    if state is not None:
        check_run_data(state, s.train, s.val, "--resume")
    if keep is not None:
        keep["setup"] = s
    if s.rank != 0:  # rank 0 writes the run directory and holds its lock
        result = _pretrain(s, run_dir, state, progress, stop_at_step, _quiet)
    else:
        with run_lock(run_dir):
            check_run_dir(run_dir, resume, locked=True)  # a run that ended while this one was being built
            result = _pretrain(s, run_dir, state, progress, stop_at_step, log)
    distributed.finish()  # torchrun: no rank leaves while another still writes or talks
    return result


def _pretrain(s: Setup, run_dir: Path, state: Optional[dict], progress, stop_at_step, log) -> dict:
    cfg = s.cfg
    files = RunFiles(run_dir, metric_fields(cfg.method.name), enabled=s.rank == 0)
    if state is None:
        pos = Position(planned_epochs=cfg.optim.epochs,
                       baselines={"knn_pixels": pixels_knn(s), "knn_untrained": monitor(s)})
        start = time.perf_counter()
        if cfg.method.bank_init == "calibrated" and hasattr(s.model, "calibrate_bank"):
            calibrate(s)
        pos.elapsed = pos.calib_s = time.perf_counter() - start
        files.start(dump_yaml(cfg), skipped=s.train.skipped)
        files.add_metrics({"epoch": 0, "step": 0, "seconds": f"{pos.elapsed:.2f}",
                           "knn_top1": _fmt(pos.baselines["knn_untrained"])})
    else:
        pos = restore(s, state)
        if s.world > 1:  # the checkpoint holds rank 0's RNG: each rank continues its own stream
            torch.manual_seed(cfg.run.seed + 1000 * s.rank + pos.step)
        files.start(dump_yaml(cfg), (pos.epoch + 1, pos.step), s.train.skipped)
    bb = s.model.backbone
    if s.choices:
        log(recipe.summary(s.choices))
    if s.capture_note:
        log(s.capture_note)
    if s.captured is not None:
        s.captured.log = log
    log(f"edgessl pretrain: {data_lib.describe(s.train)} | {bb.timm_name} "
        f"(output stride {bb.output_stride}, {bb.feature_dim}-d) | {cfg.method.name} | {s.device} {s.precision} "
        f"({precision_why(s.cfg.run.precision, s.device)})"
        + (f" | {s.world} processes x batch {cfg.optim.batch_size}" if s.world > 1 else ""))
    show = (sys.stderr.isatty() if progress is None else progress) and s.rank == 0
    s.model.train()
    try:
        stopped = loop.run(loop_steps(s, files, show), pos, lambda step: step == stop_at_step)
    except RuntimeError as e:
        if s.world == 1:
            raise
        # a collective failed: another rank died or stopped answering (gloo / nccl / timeout)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgesslError(f"rank {s.rank} of {s.world}: a collective failed, another process probably died "
                           f"({first[:300]}); the last checkpoint is kept, --resume continues") from e
    result = summary(s, files, pos, log, stopped)
    if s.rank == 0 and cfg.run.report and not result["stopped_early"]:
        from edgessl.report import write_report

        result["report"] = str(write_report(run_dir))
        log(f"report     {result['report']}")
    return result


def restore(s: Setup, state: dict) -> Position:
    checkpoint.restore_training(state, s.model, s.optimizer, s.scaler)
    return Position.from_state(state["position"])


def _quiet(*_) -> None:
    pass


def save(s: Setup, files: RunFiles, pos: Position) -> None:
    if not files.enabled:
        return
    bb = s.model.backbone
    checkpoint.save({"config": to_dict(s.cfg), "position": pos.state(),
                     **checkpoint.training_state(s.model, s.optimizer, s.scaler),
                     "method_args": {"num_samples": len(s.train), **method_args(s.cfg, s.train)},
                     "data": s.data_identity, "backbone": {
                         "timm_name": bb.timm_name, "model_args": bb.model_args, "output_stride": bb.output_stride,
                         "feature_dim": bb.feature_dim, "image_size": s.image_size}}, files.ckpt)


def _fmt(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}"


def loop_steps(s: Setup, files: RunFiles, show: bool) -> Steps:
    """Pretraining's steps, as the loop (edgessl.loop) runs them."""
    c = s.cfg

    def begin_epoch(pos: Position) -> None:  # the order, seeded by (seed, epoch): the same on every rank
        pos.perm = torch.randperm(len(s.train), generator=torch.Generator().manual_seed(
            c.run.seed * 100_003 + pos.epoch)).to(s.device)  # once an epoch: a step's indices are a slice of it

    def step(pos: Position, total: int) -> Step:
        start = pos.epoch_step * c.optim.batch_size * s.world + s.rank * c.optim.batch_size  # this rank's slice
        idx = pos.perm[start:start + c.optim.batch_size]
        warmup = int(c.optim.warmup_epochs * s.steps_per_epoch)
        out = train_step(s, idx, lr_at(pos.step, total, warmup, c.optim.lr), pos.step, total)
        return Step(["loss", *out["parts"]], out["values"], out["skipped"])

    def save_steps(pos: Position, step_log: list) -> None:
        files.add_steps(step_log)
        save(s, files, pos)

    return Steps(s.steps_per_epoch, step, lambda *a: end_epoch(s, files, *a), save_steps, begin_epoch, s.device,
                 s.sync_every, c.optim.batch_size * s.world, c.optim.minutes * 60 if c.optim.minutes else None,
                 every_steps=c.run.checkpoint_every_steps, every_minutes=c.run.checkpoint_every_minutes,
                 desc="epoch", show=show)


def train_step(s: Setup, idx: torch.Tensor, lr: float, step: int, total: int = 1) -> dict:
    """One augmented batch forward, backward, optimizer step, then the method's no-grad update
    (run.capture: the same, as one CUDA graph)."""
    progress = min(1.0, (step + 1) / total)
    if s.captured is not None:
        return s.captured(idx, lr, progress)
    set_lr(s.optimizer, lr)
    a = s.cfg.augment
    out = forward_step(s, idx, size_at(step, total, s.image_size, a.start_size, a.ramp))  # (progressive resolution)
    # reading is free on the CPU (sync_every 1): a NaN stops the run before the weights or the bank take it in
    out["skipped"] = guarded_step(out["loss"], s.optimizer, s.scaler, step, s.device, read=s.sync_every == 1)
    s.model.update(out, progress)
    return out


def forward_step(s: Setup, idx: torch.Tensor, side: int = 0) -> dict:
    """The method's output on the augmented batch `idx` (views x B images of `side` px, 0: the run's
    size), with its loss and parts stacked in `values`, on the device: the loop reads them every
    run.sync_every steps (read_steps)."""
    raw = s.train.images[idx]
    images = torch.cat([s.augment(raw, side) for _ in range(s.model.num_views)])  # (views * B, 3, S, S)
    labels = s.train.labels[idx] if s.train.labels is not None else None
    with autocast(s.device, s.precision):
        out = (s.model if s.forward is None else s.forward)(images, idx, labels)
    out["values"] = torch.stack([out["loss"].detach().float(), *(v.detach().float() for v in out["parts"].values())])
    return out


def graph_step(s: Setup, idx: torch.Tensor, progress: torch.Tensor) -> dict:
    """The step a CUDA graph records (capture.StaticStep): forward_step, backward, the optimizer step
    (its learning rate a tensor) and the method's update, with nothing read from the device. The
    loop checks the loss when it reads it, every run.sync_every steps."""
    out = forward_step(s, idx)
    out["loss"].backward()
    s.optimizer.step()
    s.model.update(out, progress)
    return {"values": out["values"], "parts": list(out["parts"])}


def end_epoch(s: Setup, files: RunFiles, pos: Position, sums: dict, step_log: list, images_per_s: float,
              last: bool) -> None:
    c, steps = s.cfg, s.steps_per_epoch
    knn = monitor(s) if c.run.monitor_every and (pos.epoch % c.run.monitor_every == 0 or last) else None
    files.add_steps(step_log)
    files.add_metrics({"epoch": pos.epoch, "step": pos.step, "lr": f"{s.optimizer.param_groups[0]['lr']:.6g}",
                       **{k: f"{v / steps:.6f}" for k, v in sums.items()},
                       "seconds": f"{pos.elapsed:.2f}", "images_per_s": f"{images_per_s:.1f}",
                       "peak_mem_mb": f"{peak_mem_mb(s.device):.0f}", "knn_top1": _fmt(knn)})
    pos.last_loss, pos.last_score = sums.get("loss", 0.0) / steps, knn
    save(s, files, pos)


def summary(s: Setup, files: RunFiles, pos: Position, log, stopped: bool = False) -> dict:
    c = s.cfg
    images = pos.step * c.optim.batch_size * s.world
    out = {"run_dir": str(files.dir), "method": c.method.name, "backbone": s.model.backbone.timm_name,
           "device": str(s.device), "precision": s.precision, "epochs": pos.epoch, "steps": pos.step,
           "seconds": round(pos.elapsed, 2), "images_per_s": round(images / max(pos.elapsed, 1e-9), 1),
           "peak_mem_mb": round(peak_mem_mb(s.device)), "final_loss": pos.last_loss,
           "knn_top1": pos.last_score, **pos.baselines, "stopped_early": stopped,
           "skipped_steps": pos.skipped_steps}
    lines = [f"run        {out['run_dir']}",
             f"trained    {out['epochs']} epochs, {out['steps']} steps in {out['seconds']:.0f} s "
             f"({out['images_per_s']:.0f} images/s, peak memory {out['peak_mem_mb']} MB)",
             f"loss       {out['final_loss']:.4f}" if out["final_loss"] is not None else "loss       -"]
    if out["knn_pixels"] is not None:
        lines.append(f"kNN top-1  {_fmt(out['knn_top1']) or '-'} % trained | {_fmt(out['knn_untrained'])} % untrained "
                     f"network | {_fmt(out['knn_pixels'])} % raw pixels  (k={c.run.knn_k}, held-out "
                     f"{len(s.val)} images)")
        margin = pixels_margin(out["knn_pixels"], len(s.val))
        if out["knn_top1"] is not None and out["knn_top1"] - out["knn_pixels"] < margin:
            lines.append(f"note       trained kNN is not above raw pixels by more than the noise of {len(s.val)} "
                         f"held-out images ({margin:.1f} points): these features add little to the pixels yet")
    lines.append(f"files      {files.dir}/{{config.yaml, metrics.csv, steps.csv, checkpoint.pt}}")
    if stopped:
        lines.append(f"stopped    at step {pos.step}, checkpoint saved: --resume continues the run")
    log("\n".join(lines))
    return out
