"""Pretraining methods: one file each, the same small interface, one registry.

A method is an nn.Module with
- `num_views`: augmented views per image the trainer stacks (1 for memdistill),
- `loss_parts`: the names of the loss terms its forward reports (metrics.csv columns),
- `forward(images, indices, labels) -> {"loss": scalar, "parts": {name: detached scalar}, ...}`,
- a no-grad `update(out, progress)` hook the trainer calls after the optimizer step
  (progress: the fraction of the schedule done),
- `needs_labels` (optional): the constructor takes `num_classes`.

METHODS is the one list of method names: the CLI's choices, config validation, metrics
columns and the scripts read it. Classes are imported on first use, so `edgessl --help`
and config validation stay free of torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


MEMORY_BANK = ("head_dims", "temperature", "bank_momentum", "bank_init", "bank_init_augment", "bank_update",
               "negatives", "sqrtkl_weight", "sqrtkl_temperature", "cutmix_alpha", "cutmix_prob")


@dataclass(frozen=True)
class Method:
    target: str  # "module:Class"
    preset: dict = field(default_factory=dict)  # config overrides the name implies
    summary: str = ""
    settings: tuple = ()  # the method section's keys it reads (besides name); others are refused for it

    def load(self):
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


METHODS = {
    "memdistill": Method("edgessl.methods.memdistill:MemDistill", {},
                         "single view, memory bank: calibrated init, grad bank update (the default)", MEMORY_BANK),
    # NPID (Wu et al. 2018) with a full softmax: every memdistill improvement off
    "npid": Method("edgessl.methods.memdistill:MemDistill",
                   {"bank_init": "random", "bank_update": "ema", "bank_momentum": 0.5, "sqrtkl_weight": 0.0,
                    "cutmix_prob": 0.0},
                   "NPID: memdistill with random bank init and EMA update", MEMORY_BANK),
    "simclr": Method("edgessl.methods.simclr:SimCLR", {"head_dims": [1024, 128], "temperature": 0.2},
                     "two views, NT-Xent, 2-layer head", ("head_dims", "temperature")),
    "byol": Method("edgessl.methods.byol:BYOL", {"head_dims": [1024, 128], "predictor_dims": [1024, 128]},
                   "two views, predictor, EMA target", ("head_dims", "predictor_dims", "byol_momentum")),
    "supervised": Method("edgessl.methods.supervised:Supervised", {}, "cross entropy on labels (reference)"),
}
PRESETS = {name: m.preset for name, m in METHODS.items()}  # configs/npid.yaml repeats NPID's; a test checks


def method_class(name: str):
    from edgessl.errors import EdgesslError

    if name not in METHODS:
        raise EdgesslError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name].load()


def loss_parts(name: str) -> tuple[str, ...]:
    """The loss terms method `name` reports, in metrics.csv order."""
    return tuple(method_class(name).loss_parts)


def create_method(name: str, backbone, num_samples: int, cfg, num_classes: int | None = None):
    """The method module `name` around `backbone` for a data set of `num_samples` images.

    cfg: the MethodConfig; num_classes: for methods that train on labels (else ignored)."""
    from edgessl.errors import EdgesslError

    cls = method_class(name)
    if not getattr(cls, "needs_labels", False):
        return cls(backbone, num_samples, cfg)
    if not num_classes:
        raise EdgesslError(f"--method {name} needs labelled training data")
    return cls(backbone, num_samples, cfg, num_classes=num_classes)


__all__ = ["METHODS", "PRESETS", "Method", "create_method", "loss_parts", "method_class"]
