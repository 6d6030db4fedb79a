"""Typed, strict configuration, each setting declared once.

The dataclass defaults are the recommended recipe; YAML files in configs/ and CLI
flags only override them. An unknown key or a value of the wrong type is a
ConfigError that names the key. The resolved config is written next to the run
(config.yaml) and into every checkpoint, as a plain dict.

A field made by `setting()` carries everything else there is to say about it: its
command-line flag, help, choices and, where the data picks its value, the rule
(`auto`). The CLI options, the API's shortcut keywords, the recipe line's "override
with" and the table in docs/usage.md are all made from (or checked against) these
declarations: adding a key touches its declaration and its use, nothing else.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import yaml

from edgessl.errors import ConfigError

# timm's IMAGENET_DEFAULT_MEAN / STD: one normalisation for every dataset, so an
# exported model's metadata has a single rule (no import of timm here: --help stays fast).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The exporter's names and defaults, declared once for the API and the CLI (edgessl.api, edgessl.cli)
FORMATS = ("onnx", "openvino", "litert", "executorch")  # the runtimes, edgessl.formats.FORMATS' order
PRECISIONS = ("fp32", "fp16", "int8")
KNN_K = 200  # neighbours of the kNN monitor and probe
# run.capture: eager steps before the capture, on a side stream (cuDNN's choices, the allocator, optimizer state)
CAPTURE_WARMUP = 3
ADAPT_SECONDS = 600.0  # the longest distillation of the int8 ReLU student; it stops sooner once it settles


FITS = ("squash", "crop")  # how a non-square image is made square (edgessl.data)
PLAIN_FIT = "squash"  # the fit of images that have no run to take one from (pixels, random:BACKBONE, data.load)
AUTO = "auto"  # the one spelling of "the data (or the machine) decides"


def setting(default=dataclasses.MISSING, *, flag: str = "", help: str = "", choices: tuple = (),
            auto: str = "", parse: Optional[Callable[[str], object]] = None, cli_choices: tuple = (),
            registry: str = "", default_factory=dataclasses.MISSING):
    """A config field and what the CLI and the docs make of it.

    flag: the command-line option (its name minus the dashes is the API shortcut keyword);
    choices: the values the config accepts (validated); auto: the rule that picks the value
    when it is "auto" (edgessl.recipe); parse: text -> value for the CLI (ValueError on bad
    text); cli_choices: the words the CLI accepts when they differ from `choices`; registry:
    "module:DICT" whose keys are the valid names (checked where the registry is used)."""
    meta = {"flag": flag, "help": help, "choices": tuple(choices), "auto": auto, "parse": parse,
            "cli_choices": tuple(cli_choices), "registry": registry}
    return field(default=default, default_factory=default_factory, metadata=meta)


def parse_range(text: str) -> list:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"expected MIN,MAX (e.g. 0.2,1), got {text!r}") from None
    return [lo, hi]


def parse_negatives(text: str):
    if text == "all":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"expected all or a positive integer, got {text!r}")


def parse_on_off(text: str) -> bool:
    return text == "on"


@dataclass
class DataConfig:
    spec: str = setting("", flag="--data", help="Training images: npz:PATH, cifar10:DIR, cifar100:DIR, "
                        "fashion-mnist[:DIR], folder:DIR.")
    download: bool = setting(False, flag="--download", help="cifar10:DIR, cifar100:DIR, fashion-mnist:DIR: download "
                             "the data set into DIR through torchvision when it is not there yet.")
    val_spec: Optional[str] = setting(None, flag="--val-data", help="A second dataset spec for the kNN monitor.")
    val_fraction: float = setting(0.0, flag="--val-fraction",
                                  help="Hold out this fraction (fixed seed) for the kNN monitor.")
    split_seed: int = 0  # the held-out split does not move with the run's seed
    train_subset: Optional[int] = None  # train on a fixed (split_seed) subset of N images, for data-size sweeps
    image_size: Union[str, int] = setting(
        AUTO, flag="--image-size", parse=int, help="Input size.",
        auto="images with a median short side of 64 px or less train at their own size; larger ones at 96 px on "
             "a CPU, 128 px on a GPU (never above their own short side, a multiple of 8); from the file headers of "
             "up to 512 files (folders), the array's side (npz, cifar, fashion-mnist)")
    fit: str = setting(AUTO, flag="--fit", choices=FITS,
                       help="How a non-square image is made square: squash it whole, or crop its centre square.",
                       auto="crop (the centre square, timm's evaluation rule): it learned more than squash on "
                            "photos; square arrays are the same either way")
    bad_images: str = setting("fail", flag="--bad-images", choices=("fail", "skip"),
                              help="folder: data with undecodable images: fail listing them, or train on the rest.")
    storage: str = setting("auto", flag="--storage", choices=("auto", "memory", "mmap"),
                           help="folder: hold the decoded images in RAM, or stream batches from the memory-mapped "
                           "cache on disk (auto: mmap when the cache is over a quarter of RAM).")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass
class AugmentConfig:
    # docs/method.md's single view: RandomResizedCrop(scale 0.2-1), flip, jitter p 0.8, grayscale p 0.2
    crop_scale: Union[str, tuple[float, float]] = setting(
        AUTO, flag="--crop-scale", parse=parse_range, help="Random crop area range MIN,MAX (e.g. 0.2,1).",
        auto="random crops of 20-100% of the image; 50-100% when more than 30% of the pixels of an even sample "
             "of 512 training images are the colour of their border (a plain background)")
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    # progressive resolution: the crop's side starts at start_size (None: off) and grows linearly, in steps of
    # 4 px, to the image size over the first `ramp` of the planned steps (schedule.size_at)
    start_size: Optional[int] = None
    ramp: float = 0.5


@dataclass
class BackboneConfig:
    name: str = setting("mobilenetv3", flag="--backbone", help="Alias (mobilenetv3, mobilenetv3-large, "
                        "mobilenetv4, resnet18) or any timm model name.")
    downsample: Union[str, int] = setting(AUTO, flag="--downsample", choices=(8, 16, 32), parse=int,
                                          help="Backbone output stride.",
                                          auto="16 at 64 px or less (8 for ResNets), the stock 32 above")
    init_weights: Optional[str] = setting(None, flag="--init-weights", help="Local timm state dict to start from.")


@dataclass
class MethodConfig:
    # The defaults are the recipe measured best on 2 CPU cores (docs/benchmarks.md);
    # configs/released.yaml holds the authors' released values.
    name: str = setting("memdistill", flag="--method", registry="edgessl.methods:METHODS",
                        help="Method.")  # checked by the method registry, not here
    head_dims: list[int] = field(default_factory=lambda: [128])  # one Linear, as NPID (released: 2048x3)
    temperature: float = 0.07  # tau on the instance logits (released script 0.2; 0.05 within noise, 0.03 fell)
    # m: the ema update keeps m of the old row; the grad update steps (1 - m) tau (NPID and released script 0.5;
    # 0.2 over 0.5 at 15 minutes: docs/benchmarks.md)
    bank_momentum: float = 0.2
    bank_init: str = setting("calibrated", choices=("random", "calibrated"))
    bank_init_augment: bool = False  # calibrate on augmented (True) or clean (False) views
    bank_update: str = setting("grad", choices=("ema", "grad"))  # released script: ema
    negatives: Union[str, int] = setting(
        AUTO, flag="--negatives", parse=parse_negatives, help="Bank negatives per step: all, or a number sampled.",
        auto="every bank row up to 16,384 images, 4,096 sampled beyond (the bank's matmul grows with the data, "
             "the gain does not)")
    sqrtkl_weight: float = 0.0  # lambda (released script 20); 0 turns SqrtKL off
    sqrtkl_temperature: float = 1.0  # released script: SqrtKL on raw cosines
    cutmix_alpha: float = 0.5  # Beta(alpha, alpha) for the mixing ratio
    cutmix_prob: float = 0.0  # fraction of steps that use CutMix; 0 turns it off (released script: 1)
    predictor_dims: list[int] = field(default_factory=lambda: [1024, 128])  # byol only
    byol_momentum: float = 0.99  # byol: target EMA momentum at the start, cosine to 1


@dataclass
class OptimConfig:
    name: str = setting("adamw", choices=("sgd", "adamw"))  # released script: sgd
    lr: float = 1e-3  # released: sgd 1.0 at batch 512
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.2  # released: 1e-4 (sgd); 0.2 over 0.05 in docs/benchmarks.md
    warmup_epochs: float = 0.0  # released script: no warm-up
    batch_size: Union[str, int] = setting(AUTO, flag="--batch-size", parse=int, help="Batch size.",
                                          auto="64; for fewer than 16 batches of images, halved until an epoch "
                                               "has 16 steps (at least 8)")
    epochs: Optional[int] = setting(30, flag="--epochs", parse=int, help="Epochs (wins over --minutes).")
    minutes: Optional[float] = setting(None, flag="--minutes", parse=float,
                                       help="Budget: stop at the first epoch end after this many minutes.")
    # torch's fused optimizer kernel (one pass over each tensor) on CPU and CUDA: the same update to float rounding,
    # a shorter step (docs/benchmarks.md, "The step")
    fused: bool = True


@dataclass
class RunConfig:
    seed: int = setting(0, flag="--seed", parse=int, help="Seed of the weights, the order and the augmentations.")
    device: str = setting("auto", flag="--device", help="auto, cpu, cuda or cuda:N.")
    precision: str = setting("auto", flag="--precision", choices=("auto", "bf16", "fp16", "fp32"),
                             help="auto: bf16 on CUDA and on a CPU with AMX, fp32 on other CPUs.")
    # The machine's settings (device, precision, threads, augment_threads, sync_every) are stored as given, auto
    # included, and resolved by each process where it runs (train.build): a resumed run picks for its machine.
    threads: Union[str, int] = AUTO  # intra-op threads for the network; auto: torch's default
    # threads for the augmentation alone; auto: the same as the network (more threads augmented faster:
    # scripts/bench_step.py, so the default does not pin it)
    augment_threads: Union[str, int] = AUTO
    monitor_every: int = 1  # kNN monitor every N epochs (needs labels); 0: off
    knn_k: int = KNN_K
    checkpoint_every_steps: int = 0  # also checkpoint every N steps (0: epoch ends only) ...
    checkpoint_every_minutes: float = 10.0  # ... and every M minutes of training (0: off)
    sync_bn: bool = False  # torchrun on CUDA: BatchNorm statistics over all ranks (SyncBatchNorm is CUDA-only)
    report: bool = True  # write RUN_DIR/report.html when the run ends (edgessl report writes it any time)
    # read the loss from the device every N steps (one wait for N steps); auto: every step on the CPU (where the
    # read costs nothing, so a NaN stops the run before the weights take it in), every 32 on a GPU (a NaN stops the
    # run at the next read, before any checkpoint is written: the last one is always from before it; edgessl.loop)
    sync_every: Union[str, int] = AUTO
    # CPU training: depthwise convolutions' weight gradient by edgessl.depthwise (the same numbers to float rounding;
    # PyTorch's own CPU kernel for it is the slowest part of a MobileNet step); false: PyTorch's everywhere
    fast_depthwise: bool = True
    # torch.compile the backbone (inductor)
    compile: Union[bool, str] = setting(
        AUTO, flag="--compile", cli_choices=("on", "off"), parse=parse_on_off, help="torch.compile the backbone.",
        auto="on for a CPU run planned for 3 minutes or more, or 100,000 images of 32 px (epochs x images x "
             "(side / 32)^2); off on a GPU, under torchrun, with progressive resolution (not measured there), or "
             "without a C++ compiler")
    # the whole training step as one CUDA graph, replayed (edgessl.capture)
    capture: Union[bool, str] = setting(
        AUTO, flag="--capture", cli_choices=("on", "off"), parse=parse_on_off,
        help="Record the training step as one CUDA graph and replay it (a GPU).",
        auto="on on a CUDA device where the step can be recorded (fp32 or bf16, one input size, one process, no "
             "CutMix, the fused optimizer, the images in memory); off on a CPU")


@dataclass
class FinetuneConfig:
    """`edgessl finetune`: the pretrained encoder plus a linear head, trained end to end."""

    train: str = setting("", flag="--train", help="Labelled training images (a subset is taken; default with no "
                         "--test either: the pretraining run's own training split).")
    test: str = setting("", flag="--test", help="Labelled test images (default: the run's held-out split).")
    label_fraction: Optional[float] = setting(None, flag="--label-fraction", parse=float,
                                              help="Fraction of each class's labels to use.")
    labels_per_class: Optional[int] = setting(None, flag="--labels-per-class", parse=int,
                                              help="Number of labels per class to use.")
    labels: str = setting("", flag="--labels", help="labels.csv (path,label; `edgessl select` makes the page that "
                          "writes it): train on exactly these images, paths relative to the data folder.")
    # auto's rule, from label draws on tuning splits (docs/benchmarks.md, "Few labels and the unlabelled images"):
    # propagation cost 2.8 points at 2 labels a class on flowers; from 5 to 25 it changed -0.6 to +6.4, +1.7 on
    # average; on features whose neighbours know the classes it gained 15-20 at 2 and 5 a class
    unlabelled: str = setting(AUTO, flag="--unlabelled", choices=(AUTO, "none", "propagate"),
                              help="none: the labelled images alone; propagate: the images beyond them (the "
                                   "pretraining run's own) train too, pseudo-labelled by label propagation over the "
                                   "encoder's features.",
                              auto="propagate when there are unlabelled images and at least 5 labelled ones a "
                                   "class on average, or fewer but propagation recovers held-out labels better than "
                                   "the labelled images' class means (a sign test, p < 0.05); none otherwise")
    epochs: Union[str, int] = setting(AUTO, flag="--epochs", parse=int, help="Epochs: passes over the unlabelled "
                                      "images (over the labelled ones with --unlabelled none).",
                                      auto="30 over the labelled images alone; 6 over the unlabelled ones when they "
                                           "train")
    minutes: Optional[float] = setting(None, flag="--minutes", parse=float,
                                       help="Budget: as many epochs as fit in this many minutes (at most --epochs).")
    seed: int = setting(0, flag="--seed", parse=int, help="Seed of the label draw, the head and the order.")
    init: str = setting("pretrained", flag="--init", choices=("pretrained", "random"),
                        help="pretrained, or the same architecture from scratch (the baseline).")
    batch_size: int = setting(64, flag="--batch-size", parse=int, help="Batch size.")
    lr: float = setting(0.1, flag="--lr", parse=float, help="Head learning rate (the backbone gets 0.1x).")
    backbone_lr_scale: float = 0.1
    weight_decay: float = 5e-4
    device: str = setting("auto", flag="--device", help="auto, cpu, cuda or cuda:N.")
    precision: str = setting("auto", flag="--precision", choices=("auto", "bf16", "fp16", "fp32"),
                             help="auto: bf16 on CUDA and on a CPU with AMX, fp32 on other CPUs.")


# `edgessl select`'s rules, and its default from label draws on tuning splits (docs/benchmarks.md,
# "Which images to label"; edgessl.selection)
SELECT_RULES = ("graph", "typical", "herding", "kmeans", "coverage", "random")
SELECT_DEFAULT = "graph"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def settings(cls=Config) -> dict[str, dataclasses.Field]:
    """Every field of `cls` by dotted key ("optim.lr"; a flat class: "lr"), in declaration order."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update({f"{f.name}.{k}": v for k, v in settings(hints[f.name]).items()})
        else:
            out[f.name] = f
    return out


def flagged(cls=Config) -> dict[str, dataclasses.Field]:
    """The settings that have a command-line flag, by dotted key."""
    return {k: f for k, f in settings(cls).items() if f.metadata.get("flag")}


def shortcut(f: dataclasses.Field) -> str:
    """The API keyword (and click parameter name) of a flagged setting: --val-data -> val_data."""
    return f.metadata["flag"].lstrip("-").replace("-", "_")


def auto_settings() -> dict[str, dataclasses.Field]:
    """The settings the data decides when left at auto (edgessl.recipe), by dotted key."""
    return {k: f for k, f in settings().items() if f.metadata.get("auto")}


def auto_table() -> str:
    """docs/usage.md's "What the data decides" table, made from the declarations (a test checks the page)."""
    rows = [f"| `{k}` (`{f.metadata['flag']}`) | {f.metadata['auto']} |" for k, f in auto_settings().items()]
    return "\n".join(["| key (flag) | rule |", "| --- | --- |", *rows])


def _check_type(value, tp, key):
    """Return `value` converted to `tp` (int->float, list->tuple) or raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _check_type(value, arm, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        args = typing.get_args(tp)
        if origin is list:
            return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        if len(value) == len(args):
            return tuple(_check_type(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp)) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def _apply(obj, overrides: dict, prefix: str = ""):
    """Set `overrides` (nested dict) on dataclass `obj` in place, strictly."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"config section '{prefix or '<root>'}' must be a mapping, got {overrides!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in overrides.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _check_type(value, hints[key], full))


def _check_choices(obj, cls, prefix: str = "") -> None:
    """Each declared setting's value among its choices (or auto, where the data decides it)."""
    for name, f in settings(cls).items():
        value, key = _get(obj, name), prefix + name
        allowed = f.metadata.get("choices", ())
        if allowed and value not in allowed and not (f.metadata["auto"] and value == AUTO):
            shown = (*allowed, AUTO) if f.metadata["auto"] else allowed
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, shown))}, got {value!r}")
        if f.metadata.get("auto") and not allowed and isinstance(value, str) and value != AUTO \
                and key != "method.negatives":  # (which also takes "all": validate checks it)
            raise ConfigError(f"config key '{key}' must be auto or a value, got {value!r}")


def _get(obj, key: str):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> Config:
    """Range and choice checks that types alone cannot express."""
    _check_choices(cfg, Config)
    flat = to_dict(cfg)
    m, o, d = cfg.method, cfg.optim, cfg.data
    if isinstance(m.negatives, str) and m.negatives not in ("all", AUTO) or \
            isinstance(m.negatives, int) and m.negatives < 1:
        raise ConfigError(f"config key 'method.negatives' must be all, auto or a positive integer, "
                          f"got {m.negatives!r}")
    scale = cfg.augment.crop_scale
    checks = [
        ("method.temperature", m.temperature > 0), ("method.bank_momentum", 0 <= m.bank_momentum < 1),
        ("method.sqrtkl_weight", m.sqrtkl_weight >= 0), ("method.sqrtkl_temperature", m.sqrtkl_temperature > 0),
        ("method.cutmix_alpha", m.cutmix_alpha > 0), ("method.cutmix_prob", 0 <= m.cutmix_prob <= 1),
        ("method.head_dims", len(m.head_dims) >= 1 and min(m.head_dims) >= 1),
        ("method.predictor_dims", len(m.predictor_dims) >= 1 and min(m.predictor_dims) >= 1),
        ("method.byol_momentum", 0 <= m.byol_momentum <= 1),
        ("optim.lr", o.lr > 0), ("optim.batch_size", o.batch_size == AUTO or o.batch_size >= 2),
        ("optim.epochs", o.epochs is None and o.minutes is not None or o.epochs is not None and o.epochs >= 1),
        ("optim.weight_decay", o.weight_decay >= 0), ("optim.warmup_epochs", o.warmup_epochs >= 0),
        ("optim.minutes", o.minutes is None or o.minutes > 0),
        ("data.val_fraction", 0 <= d.val_fraction < 1),
        ("data.image_size", d.image_size == AUTO or 8 <= d.image_size <= 1024),
        ("augment.crop_scale", scale == AUTO or 0 < scale[0] <= scale[1] <= 1),
        ("run.threads", _auto_or_positive(cfg.run.threads)),
        ("run.augment_threads", _auto_or_positive(cfg.run.augment_threads)),
        ("run.knn_k", cfg.run.knn_k >= 1), ("run.checkpoint_every_minutes", cfg.run.checkpoint_every_minutes >= 0),
        ("run.checkpoint_every_steps", cfg.run.checkpoint_every_steps >= 0),
        ("run.sync_every", _auto_or_positive(cfg.run.sync_every)), ("run.monitor_every", cfg.run.monitor_every >= 0),
    ]
    for key, ok in checks:
        if not ok:
            section, name = key.split(".")
            raise ConfigError(f"config key '{key}' is out of range: {flat[section][name]!r}")
    return cfg


def _auto_or_positive(value) -> bool:
    return value == AUTO or isinstance(value, int) and value >= 1


def finetune_config(overrides: dict) -> FinetuneConfig:
    """A strict FinetuneConfig from keyword overrides (unknown keys and bad values are named)."""
    ft = FinetuneConfig()
    _apply(ft, overrides, "finetune.")
    _check_choices(ft, FinetuneConfig, "finetune.")
    if sum(v is not None and v != "" for v in (ft.label_fraction, ft.labels_per_class, ft.labels)) > 1:
        raise ConfigError("give one of finetune.label_fraction, finetune.labels_per_class and finetune.labels")
    checks = [("label_fraction", ft.label_fraction is None or 0 < ft.label_fraction <= 1),
              ("labels_per_class", ft.labels_per_class is None or ft.labels_per_class >= 1),
              ("epochs", ft.epochs == AUTO or ft.epochs >= 1), ("minutes", ft.minutes is None or ft.minutes > 0),
              ("batch_size", ft.batch_size >= 2), ("lr", ft.lr > 0),
              ("backbone_lr_scale", ft.backbone_lr_scale >= 0), ("weight_decay", ft.weight_decay >= 0)]
    for key, ok in checks:
        if not ok:
            raise ConfigError(f"config key 'finetune.{key}' is out of range: {getattr(ft, key)!r}")
    return ft


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (lists, not tuples): safe in YAML and in weights_only checkpoints."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v
    return {s: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in to_sections()}


def to_sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def from_dict(overrides: dict | None = None, base: Config | None = None) -> Config:
    cfg = base if base is not None else Config()
    _apply(cfg, overrides or {})
    return validate(cfg)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML recipe as an overrides dict (not yet applied)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
