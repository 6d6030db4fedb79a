"""Rebuild anything from a run directory: its self-describing checkpoint holds the resolved
config, the backbone's construction (timm name, stem, input size) and the weights.

Two kinds of run: a pretraining run (`edgessl pretrain`: backbone, head, memory bank) and
a classifier (`edgessl finetune`: backbone plus a linear layer). export, probe and finetune
all come here; this module depends only on the layers below it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from edgessl import checkpoint, data as data_lib
from edgessl.backbones import create_backbone
from edgessl.config import Config, from_dict
from edgessl.errors import EdgesslError
from edgessl.methods import create_method


class Classifier(nn.Module):
    """A backbone and a linear layer: what `edgessl finetune` trains and exports (logits)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, C) logits
        return self.fc(self.backbone(images))


def read_state(run_dir: str | Path) -> dict:
    """The checkpoint of a run directory, loaded safely (one clear error otherwise)."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise EdgesslError(f"{run_dir} is a file; give a run directory")
    return checkpoint.load(run_dir / "checkpoint.pt")


def run_config(state: dict) -> Config:
    """The pretraining config a run was made with (a classifier's `finetune` section aside)."""
    return from_dict({k: v for k, v in state["config"].items() if k != "finetune"})


def is_classifier(state: dict) -> bool:
    return state.get("kind") == "classifier"


def new_backbone(state: dict) -> nn.Module:
    """The run's backbone architecture (stem and input size included), freshly initialised."""
    bb = state["backbone"]
    return create_backbone(state["config"]["backbone"]["name"], bb["image_size"], bb["output_stride"],
                           model_args=bb.get("model_args") or None)


def build_classifier(state: dict) -> Classifier:
    """A fine-tuning checkpoint's classifier, weights loaded strictly, in eval mode."""
    model = Classifier(new_backbone(state), len(state["classes"]))
    model.load_state_dict(state["model"], strict=True)
    return model.eval()


def build_method(state: dict, cfg: Config) -> nn.Module:
    """A pretraining checkpoint's method module (backbone, head, bank), strictly loaded, eval mode."""
    args = dict(state["method_args"])
    model = create_method(cfg.method.name, new_backbone(state), args.pop("num_samples"), cfg.method, **args)
    model.load_state_dict(state["model"], strict=True)
    return model.eval()


def data_record(train: data_lib.ImageData, val: Optional[data_lib.ImageData]) -> dict:
    """What a checkpoint records of its images: the identity of the training data (as loaded,
    before any split) and of a separately loaded held-out set."""
    own = train.source_identity or data_lib.identity(train)
    sep = val is not None and val.source_identity is not train.source_identity
    return {"train": own, "val": (val.source_identity or data_lib.identity(val)) if sep else None}


def check_run_data(state: dict, train: data_lib.ImageData, val: Optional[data_lib.ImageData], what: str) -> None:
    """The run's data must still be row for row the images its checkpoint was trained on (a
    split of the same images with the same stored settings is then the same split)."""
    stored = state.get("data") or {}
    data_lib.check_identity(stored.get("train"), train, what)
    if val is not None and stored.get("val") is not None:
        data_lib.check_identity(stored["val"], val, f"{what} (held-out images)")


def load_run(run_dir: str | Path) -> tuple[nn.Module, Config, dict]:
    """(model, config, checkpoint state) of a run directory: the method module of a
    pretraining run, or the Classifier of a fine-tuning run."""
    state = read_state(run_dir)
    cfg = run_config(state)
    return (build_classifier(state) if is_classifier(state) else build_method(state, cfg)), cfg, state


def load_encoder(run_dir: str | Path, init: str = "pretrained") -> tuple[nn.Module, Config, dict]:
    """The run's backbone (pretrained), or the same architecture freshly initialised (random)."""
    model, cfg, state = load_run(run_dir)
    if init == "random":
        return new_backbone(state).train(), cfg, state
    return model.backbone.train(), cfg, state
