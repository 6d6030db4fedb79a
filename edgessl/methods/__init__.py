"""Pretraining methods: one file each, the same small interface.

A method is an nn.Module with `num_views` (augmented views per image the trainer stacks),
`forward(images, indices, labels) -> {"loss", "parts", ...}` and a no-grad
`update(out, progress)` hook the trainer calls after the optimizer step (progress: the
fraction of the schedule done).
"""
from edgessl.methods.byol import BYOL
from edgessl.methods.memdistill import MemDistill
from edgessl.methods.simclr import SimCLR
from edgessl.methods.supervised import Supervised

METHODS = {"memdistill": MemDistill, "npid": MemDistill, "simclr": SimCLR, "byol": BYOL, "supervised": Supervised}

# Config overrides a method name implies (configs/npid.yaml repeats NPID's; a test checks).
PRESETS = {
    "memdistill": {},
    # NPID (Wu et al. 2018) with a full softmax: every memdistill improvement off
    "npid": {"bank_init": "random", "bank_update": "ema", "sqrtkl_weight": 0.0, "cutmix_prob": 0.0},
    "simclr": {"head_dims": [1024, 128], "temperature": 0.2},  # 2-layer head, NT-Xent tau 0.2
    "byol": {"head_dims": [1024, 128], "predictor_dims": [1024, 128]},
    "supervised": {},
}

__all__ = ["METHODS", "PRESETS", "BYOL", "MemDistill", "SimCLR", "Supervised"]
