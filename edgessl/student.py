"""Adapt a trained backbone to what onnxruntime runs in int8: swap the activations it has no
integer kernel for, then recover the features by a short distillation from the original.

onnxruntime's CPU provider fuses Conv with Relu or Clip into one int8 QLinearConv, but runs
HardSwish in float between Dequantize and Quantize nodes: that is what keeps int8 MobileNetV3
no faster than fp32 (docs/export.md). Hard-swish becomes ReLU here, and each squeeze-excite
block becomes a fixed per-channel scale, its gate's mean over the run's images, folded into
the conv that follows it (`fold_se_means`): at 32 px a batch-1 call is a fraction of a
millisecond, and the SE blocks' pool, two convs and gating Mul were a third of the int8
graph's nodes. The student, initialised from the teacher, then learns for a few minutes on the
run's own images, half as deployed and half augmented as in pretraining, to give the teacher's
pooled features (cosine) and the teacher's neighbours among the run's images (`neighbour_kl`:
what a kNN probe or a search over the features reads off them).
"""
from __future__ import annotations

import copy
import hashlib
import math
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from edgessl import checkpoint, loop
from edgessl.augment import BatchAugment, normalize
from edgessl.config import ADAPT_SECONDS, Config
from edgessl.depthwise import fast_depthwise, plain_depthwise
from edgessl.features import features
from edgessl.device import grad_scaler
from edgessl.errors import Stopped
from edgessl.loop import Position, Step, Steps
from edgessl.optim import guarded_step, make_optimizer, param_groups, set_lr


def swap_hardswish(module: nn.Module) -> int:
    """Replace every nn.Hardswish by nn.ReLU in place; return how many."""
    return swap_modules(module, {nn.Hardswish: nn.ReLU})


def swap_modules(module: nn.Module, swaps: dict) -> int:
    """Replace every submodule of a type in `swaps` by `swaps[type]()`, in place; return how many."""
    count = 0
    for name, child in list(module.named_modules()):
        if type(child) in swaps:
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, attr, swaps[type(child)]())
            count += 1
    return count


def is_squeeze_excite(module) -> bool:
    """A timm SqueezeExcite: pool, conv_reduce, act1, conv_expand, gate."""
    return all(hasattr(module, a) for a in ("conv_reduce", "act1", "conv_expand", "gate"))


def squeeze_excite_blocks(module: nn.Module) -> list:
    """(block, se, next_conv) for every timm block whose `se` is a squeeze-excite module (pool,
    conv_reduce, act1, conv_expand, gate) followed by an ungrouped conv (conv_pwl in an inverted
    residual, conv_pw in a depthwise-separable block)."""
    found = []
    for block in module.modules():
        se = getattr(block, "se", None)
        if not is_squeeze_excite(se):
            continue
        conv = getattr(block, "conv_pwl", None) or getattr(block, "conv_pw", None)
        if isinstance(conv, nn.Conv2d) and conv.groups == 1:
            found.append((block, se, conv))
    return found


def se_gate(se: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """The gate (B, C, 1, 1) a timm SqueezeExcite multiplies its input by, from that input's
    mean over H, W (B, C, 1, 1)."""
    return se.gate(se.conv_expand(se.act1(se.conv_reduce(pooled))))


@torch.no_grad()
def fold_se_means(module: nn.Module, images: torch.Tensor, batch_size: int = 128) -> int:
    """In place: replace every squeeze-excite block by its gate's mean over `images` (normalised
    float, N x 3 x S x S, run through `module` itself), folded into the conv that follows it
    (weight[:, c] *= mean gate c, exact for that constant); return how many. A network without
    them is left as it is."""
    blocks = squeeze_excite_blocks(module)
    sums = [torch.zeros(se.conv_expand.out_channels, dtype=torch.float64) for _, se, _ in blocks]

    def record(i):
        def hook(se, inputs, output):  # returns None: the block's output is left as it is
            sums[i].add_(se_gate(se, inputs[0].mean((2, 3), keepdim=True)).flatten(1).sum(0).double())
        return hook

    hooks = [se.register_forward_hook(record(i)) for i, (_, se, _) in enumerate(blocks)]
    was_training = module.training
    module.eval()
    try:
        for chunk in images.split(batch_size):
            module(chunk)
    finally:
        for h in hooks:
            h.remove()
        module.train(was_training)
    for (block, _, conv), total in zip(blocks, sums):
        conv.weight.mul_((total / len(images)).to(conv.weight.dtype).view(1, -1, 1, 1))
        block.se = nn.Identity()
    return len(blocks)


def neighbour_kl(student: torch.Tensor, teacher: torch.Tensor, bank: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(p_teacher || p_student), batch mean, where p_x = softmax(normalize(x) . bank / tau) is a
    feature's distribution over its neighbours in `bank` (M x D, unit rows: the teacher's features
    of the run's images). Features (B x D) need not be normalised."""
    p_t = (F.normalize(teacher, dim=1) @ bank.T / tau).softmax(1)
    log_s = (F.normalize(student, dim=1) @ bank.T / tau).log_softmax(1)
    return F.kl_div(log_s, p_t, reduction="batchmean")


@torch.no_grad()
def feature_bank(teacher: nn.Module, images: torch.Tensor, cfg: Config, most: int = 8192) -> torch.Tensor:
    """Unit features (M x D) of up to `most` of `images` (uint8, spread evenly), as deployed."""
    idx = torch.linspace(0, len(images) - 1, min(most, len(images))).long()
    return F.normalize(features(teacher, images[idx], cfg.data.mean, cfg.data.std), dim=1)


def needs_adapting(module: nn.Module) -> bool:
    """Whether int8 onnxruntime would run part of `module` in float: hard-swish, or squeeze-excite
    blocks (their pooling mean stays float, and each costs four nodes on tiny tensors)."""
    return any(isinstance(m, nn.Hardswish) for m in module.modules()) or bool(squeeze_excite_blocks(module))


# onnxruntime's int8 ops: the network as trained, rewritten in place into the same function in forms it
# quantises (the relu6 forms of hard-swish and hard-sigmoid, the gates folded, the pooling a GlobalAveragePool)


class HardSwishRelu6(nn.Module):
    """x * relu6(x + 3) / 6: exactly nn.Hardswish, in ops onnxruntime quantises (Add, Clip, Mul)."""

    def forward(self, x):
        return x * F.relu6(x + 3.0) * (1.0 / 6.0)


class HardSigmoidRelu6(nn.Module):
    """relu6(x + 3) / 6: exactly nn.Hardsigmoid, quantisable."""

    def forward(self, x):
        return F.relu6(x + 3.0) * (1.0 / 6.0)


def fold_se_gates(module: nn.Module) -> int:
    """In place, for every squeeze-excite block gated by hard-sigmoid: fold its relu6(s + 3) / 6
    into the expanding 1x1 conv (weight / 6, bias / 6 + 1/2) and gate with clip(s, 0, 1), the
    same function; return how many. Clip folds into onnxruntime's int8 conv, so the gate costs
    no Add and Mul of its own."""
    count = 0
    for m in module.modules():
        expand, gate = getattr(m, "conv_expand", None), getattr(m, "gate", None)
        if isinstance(expand, nn.Conv2d) and expand.bias is not None and isinstance(gate, nn.Hardsigmoid):
            with torch.no_grad():
                expand.weight.div_(6.0)
                expand.bias.div_(6.0).add_(0.5)
            m.gate = nn.Hardtanh(0.0, 1.0)
            count += 1
    return count


def relu6_forms(module: nn.Module) -> int:
    """Swap nn.Hardswish / nn.Hardsigmoid for their relu6 forms in place; return how many.

    onnxruntime leaves HardSwish / HardSigmoid in float with Q/DQ around each, which made
    int8 MobileNetV3-small slower than fp32 (docs/export.md)."""
    return swap_modules(module, {nn.Hardswish: HardSwishRelu6, nn.Hardsigmoid: HardSigmoidRelu6})


class PooledSqueezeExcite(nn.Module):
    """A timm squeeze-excite block whose mean over H, W is a global average pool: the same
    function, exported as GlobalAveragePool (which onnxruntime runs in int8) instead of
    ReduceMean (which it runs in float)."""

    def __init__(self, se: nn.Module):
        super().__init__()
        self.se = se

    def forward(self, x):
        return x * se_gate(self.se, F.adaptive_avg_pool2d(x, 1))


def pool_squeeze_excite(module: nn.Module) -> int:
    """Wrap every timm squeeze-excite block in PooledSqueezeExcite, in place; return how many."""
    count = 0
    for block in list(module.modules()):
        if is_squeeze_excite(getattr(block, "se", None)):
            block.se = PooledSqueezeExcite(block.se)
            count += 1
    return count


def rewrite_hard_activations(module: nn.Module) -> int:
    """For int8, in place: fold the hard-sigmoid gates into their convs (fold_se_gates), pool
    the squeeze-excite blocks as GlobalAveragePool (pool_squeeze_excite), then write the rest in
    relu6 forms (relu6_forms); return how many changed."""
    return fold_se_gates(module) + pool_squeeze_excite(module) + relu6_forms(module)


CAP_SECONDS = ADAPT_SECONDS  # the longest distillation; the student's settling stops it sooner (docs/export.md)
CHECK_EVERY = 50  # steps between two reads of the student's loss on fixed clean images
PATIENCE = 2  # reads in a row without a MIN_GAIN improvement before the learning rate halves
MIN_GAIN = 0.01  # relative
DECAYS = 3  # halvings, after which the student has settled


def settling_steps(opt: torch.optim.Optimizer, lr: float, loss_fn, probe_fn, seconds: float, desc: str,
                   show: bool) -> Steps:
    """The student's steps, as the loop (edgessl.loop) runs them: epochs of CHECK_EVERY steps on
    `loss_fn()` (a scalar tensor), each ending with a read of `probe_fn()` (its loss on fixed clean
    images); PATIENCE reads without a MIN_GAIN improvement halve the learning rate, and after DECAYS
    halvings the student has settled (pos.settled). The clock (`seconds`) is only a cap."""
    scaler, cpu = grad_scaler(torch.device("cpu"), "fp32"), torch.device("cpu")  # (a disabled scaler: fp32)

    def step(pos: Position, total: int) -> Step:
        loss = loss_fn()
        guarded_step(loss, opt, scaler, pos.step, cpu, read=True)  # the trainers' step and NaN stop
        if pos.step == 0:
            pos.baselines["loss_first"] = float(loss.detach())
        return Step(["loss"], loss.detach().float().reshape(1))

    def end_epoch(pos: Position, sums: dict, step_log: list, images_per_s: float, last: bool) -> None:
        p, read = pos.baselines, float(probe_fn())
        best, stale = p.get("best", math.inf), p.get("stale", 0)
        best, stale = (read, 0) if read < best * (1 - MIN_GAIN) else (min(best, read), stale + 1)
        p.update(best=best, stale=stale)
        if stale == PATIENCE:
            p.update(decays=p.get("decays", 0) + 1, stale=0)
            pos.settled = p["decays"] > DECAYS
            set_lr(opt, lr * 0.5 ** p["decays"])
        pos.last_loss, pos.last_score = sums["loss"] / CHECK_EVERY, best

    return Steps(CHECK_EVERY, step, end_epoch, lambda pos, step_log: None, device=cpu, budget=seconds, plan=False,
                 desc=desc, show=show)


def train_for(seconds: float, opt: torch.optim.Optimizer, lr: float, loss_fn, probe_fn, desc: str,
              progress: Optional[bool] = None, pos: Optional[Position] = None, stop=lambda step: False) -> dict:
    """Step `opt` on `loss_fn()` until the student settles or `seconds` pass (settling_steps), from
    `pos` (a resumed student) or the start. Its progress, not the CPU's speed, decides when it
    stops. Returns {"steps", "seconds", "stopped" ("settled", "time cap" or "stop request"), "loss_first",
    "loss_last" (the last CHECK_EVERY steps' mean), "probe_loss" (the best read), "position"}."""
    show = sys.stderr.isatty() if progress is None else progress
    pos = pos or Position()
    if pos.step == 0:
        set_lr(opt, lr)
    signalled = loop.run(settling_steps(opt, lr, loss_fn, probe_fn, seconds, desc, show), pos, stop)
    return {"steps": pos.step, "seconds": round(pos.elapsed, 1),
            "stopped": "stop request" if signalled else "settled" if pos.settled else "time cap",
            "loss_first": pos.baselines.get("loss_first"), "loss_last": pos.last_loss,
            "probe_loss": pos.last_score, "position": pos}


def clean_probe(student: nn.Module, teacher: nn.Module, images: torch.Tensor, cfg: Config, match, count: int = 256):
    """A function giving `match(student, teacher)` on `count` fixed images of `images` as deployed
    (no augmentation, the student in eval mode): what train_for reads to know the student settled."""
    x = normalize(images[torch.linspace(0, len(images) - 1, min(count, len(images))).long()],
                  cfg.data.mean, cfg.data.std)
    with torch.no_grad():
        target = torch.cat([teacher(c) for c in x.split(64)])

    @torch.no_grad()
    def probe():
        student.eval()
        value = match(torch.cat([student(c) for c in x.split(64)]), target)
        student.train()
        return value

    return probe


def distill(teacher: nn.Module, images: torch.Tensor, cfg: Config, seconds: float = CAP_SECONDS,
            batch_size: int = 64, lr: float = 1e-3, seed: int = 0, progress: Optional[bool] = None,
            fold_se: bool = True, clean_fraction: float = 0.5, neighbours: float = 1.0,
            tau: float = 0.05, keep: Optional[Path] = None, stop_at_step: Optional[int] = None) -> tuple:
    """(student, stats): the teacher with hard-swish swapped for ReLU (and with `fold_se`, its
    squeeze-excite blocks folded to their mean gates), trained until it settles (train_for; at most
    `seconds`) so its pooled features match the teacher's on `images` (uint8 N x 3 x S x S):
    1 - cosine, plus `neighbours` times `neighbour_kl` over the teacher's features of `images` at
    temperature `tau`.
    `clean_fraction` of each batch is as deployed (flipped at random), the rest augmented as in
    pretraining.

    `keep`: a folder where the student is saved when it stops, named by what it learns from (the
    teacher's weights, the images, these settings): a later call with the same continues it
    (stopped by SIGINT / SIGTERM or `stop_at_step`) exactly, or reuses it (finished). A stop request
    saves it and raises EdgesslError."""
    identity = _identity(teacher, images, seconds, batch_size, lr, seed, fold_se, clean_fraction, neighbours, tau)
    torch.manual_seed(seed)
    teacher = teacher.eval()
    student, swapped, folded = relu_student(teacher, images, cfg, fold_se)
    augment = BatchAugment(cfg.augment, images.shape[-1], cfg.data.mean, cfg.data.std)
    opt = make_optimizer(param_groups(student, 0.0), "adamw", lr, fused=cfg.optim.fused)
    clean = round(clean_fraction * batch_size)  # images as deployed (flipped at random), the rest augmented
    bank = feature_bank(teacher, images, cfg) if neighbours else None

    def match(out, target):
        value = (1 - F.cosine_similarity(out, target, dim=1)).mean()
        return value + neighbours * neighbour_kl(out, target, bank, tau) if bank is not None else value

    def loss():
        idx = torch.randint(0, len(images), (batch_size,))
        flip = torch.rand(clean) < 0.5
        plain = torch.where(flip.view(-1, 1, 1, 1), images[idx[:clean]].flip(-1), images[idx[:clean]])
        x = torch.cat([normalize(plain, cfg.data.mean, cfg.data.std), augment(images[idx[clean:]])])
        with torch.no_grad():
            target = teacher(x)
        return match(student(x), target)

    probe = clean_probe(student, teacher, images, cfg, match)
    path = keep / f"{identity}.pt" if keep is not None else None
    stats = kept_train_for(path, student, opt, lr, loss, probe, seconds, progress, lambda step: step == stop_at_step)
    plain_depthwise(student)
    return student.eval(), {"swapped": swapped, "se_folded": folded, **stats}


def kept_train_for(path: Optional[Path], student: nn.Module, opt, lr: float, loss, probe, seconds: float,
                   progress, stop) -> dict:
    """train_for from the student saved at `path` (when there is one), saved there again when it
    ends or stops; a stop request raises Stopped once it is saved."""
    scaler = grad_scaler(torch.device("cpu"), "fp32")  # (disabled: the student trains in fp32)
    pos = None
    if path is not None and path.is_file():
        saved = checkpoint.load(path)
        checkpoint.restore_training(saved, student, opt, scaler)
        pos = Position.from_state(saved["position"])
    stats = train_for(seconds, opt, lr, loss, probe, "int8: distilling ReLU student", progress, pos, stop)
    pos = stats.pop("position")
    if path is not None:
        path.parent.mkdir(exist_ok=True)
        checkpoint.save({"kind": "student", "position": pos.state(),
                         **checkpoint.training_state(student, opt, scaler)}, path)
    if stats["stopped"] == "stop request":
        kept = f"; it is kept in {path}: the same export continues it" if path is not None else ""
        raise Stopped(f"the int8 student's distillation was stopped at step {stats['steps']}{kept}")
    return stats


def relu_student(teacher: nn.Module, images: torch.Tensor, cfg: Config, fold_se: bool) -> tuple:
    """(student, hard-swishes swapped, squeeze-excite blocks folded): a copy of the teacher with
    ReLU for hard-swish and, with `fold_se`, its gates folded to their means over `images`; in
    training mode, with the run's depthwise kernel (edgessl.depthwise)."""
    student = copy.deepcopy(teacher)
    swapped = swap_hardswish(student)
    folded = 0
    if fold_se:
        idx = torch.linspace(0, len(images) - 1, min(512, len(images))).long()
        folded = fold_se_means(student, normalize(images[idx], cfg.data.mean, cfg.data.std))
    if cfg.run.fast_depthwise:  # the run's kernel settings: the faster CPU backward
        fast_depthwise(student)
    return student.train(), swapped, folded


def _identity(teacher: nn.Module, images: torch.Tensor, *settings) -> str:
    """What a student learns from, as a name: the teacher's weights, the images and the settings."""
    h = hashlib.sha256(repr(settings).encode())
    for t in teacher.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(repr(tuple(images.shape)).encode())
    h.update(images[torch.linspace(0, len(images) - 1, min(64, len(images))).long()].cpu().numpy().tobytes())
    return h.hexdigest()[:16]
