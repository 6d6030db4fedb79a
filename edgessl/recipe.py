"""The data decides the recipe: what the `auto` config values become for a run.

One rule for every dataset, applied when a run starts (never on --resume: the stored run
keeps its values), printed in one line and stored resolved in config.yaml. Every choice
is a config key (and a `pretrain` flag); a value given there is kept as given.

    data.image_size     the images' own size up to SMALL_SIDE px (median short side of
                        the files, or the array's side); larger images go to
                        PHOTO_SIZE on a CPU and GPU_PHOTO_SIZE on a GPU (docs/benchmarks.md,
                        "Your own photos": kNN and images/s at 48-128 px)
    data.fit            how a non-square image becomes square: FIT, by measurement
    backbone.downsample output stride from the input size (backbones.auto_downsample)
    augment.crop_scale  (0.2, 1), or (0.5, 1) on a plain background: when on average more than
                        PLAIN_BACKGROUND of the pixels are the colour of the image's border
                        (product shots, scans, Fashion-MNIST: 0.53; CIFAR-10 0.10, flower
                        photos 0.08), a fifth of the image is often background only
    method.negatives    every bank row up to 16,384 images, 4,096 sampled beyond
                        (methods.memdistill.auto_negatives: the bank's matmul grows with
                        the data, the gain does not)
    optim.batch_size    64; for a set of fewer than 16 batches, the largest power of two
                        that gives 16 steps an epoch (at least 8)
    run.compile         torch.compile the backbone on a CPU when the run is planned for at
                        least COMPILE_MIN_MINUTES or COMPILE_MIN_IMAGES (in 32 px images);
                        compiling is a fixed cost that a faster step repays
                        (docs/benchmarks.md); off on a GPU and under torchrun (not measured),
                        with progressive resolution (each size recompiles), and without a
                        C++ compiler (inductor needs one)
    run.capture         the whole step as one CUDA graph on a GPU where the step can be one
                        (edgessl.capture.why_not: fp32 or bf16, one input size, one process,
                        no CutMix, images in memory); off on a CPU, where a step is not
                        launch-bound

What the rule cannot see it leaves alone: the budget (--minutes) changes no learning choice
(the sizes were compared at 15 minutes), only whether to compile, and nothing keys on a
dataset's name or path.
"""
from __future__ import annotations

import os
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from edgessl import data as data_lib
from edgessl.config import AUTO, auto_settings, settings
from edgessl.methods import METHODS

SMALL_SIDE = 64  # images this small train at their own size
PHOTO_SIZE = 96  # larger images on a CPU (output stride 32: cheaper than 64 px at stride 16, and learned more)
GPU_PHOTO_SIZE = 128  # larger images on a GPU (not measured on one: docs/usage.md)
FIT = "crop"  # data.fit "auto": squash | crop (docs/benchmarks.md: the centre crop learned more on photos)
SURVEY_FILES = 512  # header reads to estimate a folder's native sizes
CROP_SCALE = (0.2, 1.0)  # docs/method.md's crops ...
BACKGROUND_TOL = 8  # ... unless pixels this close (0-255) to the border's colour ...
PLAIN_BACKGROUND = 0.3  # ... are more than this fraction of the image: then
# (a search on Fashion-MNIST picked it: git show 4138b9e:configs/bench/fmnist_search.yaml)
PLAIN_CROP_SCALE = (0.5, 1.0)
BATCH = 64
COMPILE_MIN_MINUTES = 3.0  # a budget from which compiling (a fixed cost) pays ...
COMPILE_MIN_IMAGES = 100_000  # ... or epochs x images x (side / 32)^2: about 3 minutes at 32 px


@dataclass
class Choice:
    key: str  # dotted config key
    value: object
    why: str
    given: bool = False  # the user set it: kept, and shown as given


def survey(spec: str, sample: int = SURVEY_FILES) -> Optional[dict]:
    """Native size statistics of a folder spec from the file headers of an even sample of its
    files (no pixel decoded): {"files", "short_side", "aspect"} as medians; None for other specs
    or when no header reads."""
    from PIL import Image

    from edgessl_edge.image import IMAGE_SUFFIXES

    kind, _, rest = spec.partition(":")
    if kind != "folder" or not Path(rest).is_dir():
        return None
    files = sorted(p for p in Path(rest).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    step = max(1, len(files) // sample)
    shorts, aspects = [], []
    for p in files[::step][:sample]:
        try:
            with Image.open(p) as im:
                w, h = im.size
        except Exception:  # a bad file is reported by the decoder, with the rest of them
            continue
        if min(w, h) > 0:
            shorts.append(min(w, h))
            aspects.append(max(w, h) / min(w, h))
    if not shorts:
        return None
    return {"files": len(files), "short_side": statistics.median(shorts), "aspect": statistics.median(aspects)}


def image_size(native_short: float, device: torch.device) -> tuple[int, str]:
    """(input size, why) for images whose median short side is `native_short` px."""
    if native_short <= SMALL_SIDE:
        return int(native_short), f"the images' own size ({native_short:g} px)"
    target = GPU_PHOTO_SIZE if device.type == "cuda" else PHOTO_SIZE
    size = min(target, int(native_short) // 8 * 8)
    return size, f"{'GPU' if device.type == 'cuda' else 'CPU'} size for {native_short:g} px images"


def background_fraction(images: torch.Tensor, count: int = 512) -> float:
    """Mean fraction of an image's pixels that are background: within BACKGROUND_TOL (all three
    channels, 0-255) of the median colour of its border. uint8 (N, C, H, W), an even sample of
    `count` images (a memory-mapped set reads only those rows)."""
    n = images.shape[0]
    rows = torch.linspace(0, n - 1, min(n, count)).long()
    total = 0.0
    for i in rows.tolist():
        x = images[i].int()  # (C, H, W)
        border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], 1)
        colour = border.median(1).values[:, None, None]
        total += ((x - colour).abs().amax(0) <= BACKGROUND_TOL).float().mean().item()
    return total / len(rows)


def input_choices(cfg, device: torch.device) -> list[Choice]:
    """The choices made before any image is decoded: input size and fit."""
    d = cfg.data
    out = []
    if d.image_size != AUTO:
        out.append(Choice("data.image_size", d.image_size, "given", True))
    else:
        stats = survey(d.spec)
        if stats is not None:
            size, why = image_size(stats["short_side"], device)
            out.append(Choice("data.image_size", size, why))
        # arrays (npz, cifar, fashion-mnist): their own size, decided once they are read
    out.append(Choice("data.fit", d.fit, "given", True) if d.fit != AUTO else
               Choice("data.fit", FIT, "measured on photos"))
    return out


def array_size(native: tuple[int, int], device: torch.device) -> Choice:
    """The input size of an array dataset (no files to survey): the same rule on its side."""
    size, why = image_size(min(native), device)
    return Choice("data.image_size", size, why)


def compile_choice(cfg, n: int, image_size_: int, device: torch.device, world: int) -> Choice:
    """run.compile: on for a CPU run long enough to earn back the compilation (module docstring)."""
    if cfg.run.compile != AUTO:
        return Choice("run.compile", cfg.run.compile, "given", True)
    o = cfg.optim
    images = None if o.epochs is None else o.epochs * n * (image_size_ / 32) ** 2
    off = ("a GPU: not measured" if device.type != "cpu" else
           "torchrun: not measured" if world > 1 else
           "progressive resolution" if cfg.augment.start_size is not None else
           "no C++ compiler" if not shutil.which(os.environ.get("CXX", "g++")) else  # inductor's default
           # inductor's step of a MobileNetV3 with edgessl.depthwise gave NaN there (docs/benchmarks.md, "The step")
           "AVX2 kernels: not measured, and NaN at one thread" if torch.backends.cpu.get_cpu_capability() == "AVX2" else
           f"{o.minutes:g} minutes" if o.minutes is not None and o.minutes < COMPILE_MIN_MINUTES else
           "a short run" if images is not None and images < COMPILE_MIN_IMAGES else None)
    if off:
        return Choice("run.compile", False, off)
    return Choice("run.compile", True, f"{o.minutes:g} minutes" if images is None else "a long run")


def capture_choice(cfg, device: torch.device, world: int, mapped: bool = False) -> Choice:
    """run.capture: the step as one CUDA graph wherever it can be one (edgessl.capture.why_not)."""
    from edgessl.capture import why_not
    from edgessl.device import resolve_precision

    if cfg.run.capture != AUTO:
        return Choice("run.capture", cfg.run.capture, "given", True)
    if device.type == "cpu":
        return Choice("run.capture", False, "a CPU")
    off = why_not(cfg, device, resolve_precision(cfg.run.precision, device), world, mapped)
    return Choice("run.capture", off is None, off or "a launch-bound GPU step")


def training_choices(cfg, images: torch.Tensor, image_size_: int, device: torch.device,
                     world: int = 1) -> list[Choice]:
    """The choices that need the decoded training images: stride, crops, negatives, batch, compile."""
    from edgessl.backbones import auto_downsample, resolve_name

    n = images.shape[0]
    out = []
    b = cfg.backbone
    if b.downsample == AUTO:
        out.append(Choice("backbone.downsample", auto_downsample(resolve_name(b.name), image_size_),
                          f"for {image_size_} px"))
    else:
        out.append(Choice("backbone.downsample", b.downsample, "given", True))
    a = cfg.augment
    if a.crop_scale == AUTO:
        bg = background_fraction(images)
        plain = bg > PLAIN_BACKGROUND
        out.append(Choice("augment.crop_scale", PLAIN_CROP_SCALE if plain else CROP_SCALE,
                          f"{100 * bg:.0f}% background{': plain' if plain else ''}"))
    else:
        out.append(Choice("augment.crop_scale", tuple(a.crop_scale), "given", True))
    m = cfg.method
    if "negatives" not in METHODS[m.name].settings:
        pass  # a method without a memory bank has no negatives to pick
    elif m.negatives == AUTO:
        from edgessl.methods.memdistill import auto_negatives

        out.append(Choice("method.negatives", auto_negatives(n), f"{n} images"))
    else:
        out.append(Choice("method.negatives", m.negatives, "given", True))
    o = cfg.optim
    if o.batch_size == AUTO:
        bs = BATCH
        while bs > 8 and n < 16 * bs:
            bs //= 2
        out.append(Choice("optim.batch_size", bs, f"{n} images"))
    else:
        out.append(Choice("optim.batch_size", o.batch_size, "given", True))
    out.append(compile_choice(cfg, n, image_size_, device, world))
    out.append(capture_choice(cfg, device, world, mapped=not isinstance(images, torch.Tensor)))
    return out


def resolve(cfg, device: torch.device, world: int = 1, decide: bool = True):
    """(choices, train, held-out): the run's images, loaded at the size the rule picks, and with
    `decide` (a new run, not a resumed one) every auto value picked from them, written into cfg
    in place. An array data set is read at its own size first; one larger than the rule's size is
    read again at that size (its rows' identity is the one the run trains on)."""
    choices = input_choices(cfg, device) if decide else []
    apply(cfg, choices)
    train, val = data_lib.load_split(cfg.data)
    if decide and cfg.data.image_size == AUTO:  # an array dataset: the same size rule on its own side
        size = array_size(train.images.shape[-2:], device)
        choices.insert(0, size)
        apply(cfg, [size])
        if size.value != train.images.shape[-1]:
            train, val = data_lib.load_split(cfg.data)
    if decide:
        more = training_choices(cfg, train.images, train.images.shape[-1], device, world)
        apply(cfg, more)
        choices += more
    return choices, train, val


def apply(cfg, choices: list[Choice]) -> None:
    """Write the choices into the config (in place): what config.yaml stores."""
    for c in choices:
        section, name = c.key.split(".")
        setattr(getattr(cfg, section), name, c.value)


def flag(key: str) -> str:
    """The pretrain flag that overrides a choice (config.py declares it)."""
    return settings()[key].metadata["flag"]


def is_auto(key: str, value) -> bool:
    """Whether a config value is left to the recipe."""
    return key in auto_settings() and value == AUTO


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return "-".join(f"{v:g}" for v in value)
    return str(value)


def summary(choices: list[Choice]) -> str:
    """The one line `pretrain` prints: each choice, why, and the flag that overrides it."""
    parts = [f"{c.key.split('.')[1]} {_show(c.value)} ({c.why})" for c in choices]
    picked = [flag(c.key) for c in choices if not c.given]
    tail = f"; override with {', '.join(picked)}" if picked else ""
    return "recipe: " + ", ".join(parts) + tail
